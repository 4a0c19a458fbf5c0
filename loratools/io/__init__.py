"""The only package that touches the disk or the network: checkpoints, adapters, Hub ids."""

"""Where the llama.cpp build that judges GGUF files lives: ../shared/tools/llama.cpp beside the checkout
(CI lays a copy of shared/ there too). Tests that use it skip cleanly when it is absent."""

from __future__ import annotations

from pathlib import Path

LLAMA_CPP = Path(__file__).resolve().parents[2] / "shared" / "tools" / "llama.cpp"
LLAMA_BIN = LLAMA_CPP / "bin"

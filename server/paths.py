"""Where the shipped assets (SAEs, risk probes, sparsity tables) live inside the installed package."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"

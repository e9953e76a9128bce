"""LoRA adapters loaded at start-up (`--lora NAME=PATH`, PEFT format) and chosen per request by name.

vLLM applies an adapter inside its own layers, so the residual stream our hooks read and steer is the adapted
model's. vLLM's prefix-cache block hashes include the adapter, so KV is never shared across adapters.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from featurelens.server.config import SettingsError

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Adapter:
    name: str
    lora_id: int  # vLLM's integer id: 1, 2, ... in the order given
    path: str
    rank: int
    target_modules: tuple[str, ...]

    def request(self) -> LoRARequest:
        from vllm.lora.request import LoRARequest

        return LoRARequest(self.name, self.lora_id, self.path)


def load_adapters(specs: list[str], max_rank: int) -> dict[str, Adapter]:
    """`--lora NAME=PATH` values → adapters by name, each folder's adapter_config.json read and checked, or
    SettingsError saying which one is wrong."""
    adapters: dict[str, Adapter] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise SettingsError(f"lora: {spec!r} is not NAME=PATH")
        if not ADAPTER_NAME.match(name):
            raise SettingsError(f"lora: adapter name {name!r} must be 1-64 letters, digits and . _ - "
                                "(starting with a letter or digit)")
        if name in adapters:
            raise SettingsError(f"lora: adapter {name!r} given twice")
        folder = Path(path).expanduser()
        config_file = folder / "adapter_config.json"
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as error:
            raise SettingsError(f"lora: {name}: cannot read {config_file} ({error})") from error
        if str(config.get("peft_type", "LORA")).upper() != "LORA":
            raise SettingsError(f"lora: {name}: peft_type {config.get('peft_type')!r} is not LORA")
        rank = int(config.get("r", 0))
        if not 1 <= rank <= max_rank:
            raise SettingsError(f"lora: {name}: rank {rank} is outside 1..{max_rank} (--max-lora-rank)")
        targets = config.get("target_modules") or ()
        adapters[name] = Adapter(name, len(adapters) + 1, str(folder.resolve()), rank,
                                 tuple([targets] if isinstance(targets, str) else targets))
    return adapters

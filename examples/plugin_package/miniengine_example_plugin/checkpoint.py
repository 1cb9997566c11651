"""Write a Hugging Face Llama checkpoint in the example format: the same tensors under the plugin's names,
and `architectures` naming the plugin's model. (How a third party would ship its own checkpoints.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from miniengine_example_plugin import ARCHITECTURE
from miniengine_example_plugin.model import from_llama_name


def convert_llama_checkpoint(llama_dir: str | Path, out_dir: str | Path) -> Path:
    """Rename every tensor of the Llama checkpoint in `llama_dir` into `out_dir` (config and tokenizer files
    copied, `architectures` changed)."""
    llama_dir, out_dir = Path(llama_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path in sorted(llama_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                ours = from_llama_name(name)
                if ours is None:
                    raise KeyError(f"{path.name}: {name!r} has no name in the example checkpoint format")
                tensors[ours] = f.get_tensor(name)
    save_file(tensors, str(out_dir / "model.safetensors"))
    config = json.loads((llama_dir / "config.json").read_text())
    config["architectures"] = [ARCHITECTURE]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (llama_dir / name).exists():
            shutil.copy(llama_dir / name, out_dir / name)
    return out_dir

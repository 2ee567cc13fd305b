"""Model recipes: one TOML file per model family under ``dhsa_export/recipes``.

A recipe says where the weights come from (a pinned package, parts to join, the local HF
cache) and the exact architecture, so ``NAME:random`` can build the same shapes offline.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    architecture: str
    source: dict
    config: dict
    dhsa: dict

    @property
    def source_description(self) -> str:
        kind = self.source["kind"]
        if kind == "hf-cache":
            return f"local Hugging Face cache: {self.source['repo']}"
        return f"{self.source['file']} (sha256 {self.source['sha256'][:12]}...)"


@lru_cache(maxsize=None)
def recipe_names() -> tuple[str, ...]:
    return tuple(sorted(path.stem for path in RECIPE_DIR.glob("*.toml")))


@lru_cache(maxsize=None)
def load_recipe(name: str) -> Recipe:
    data = tomllib.loads((RECIPE_DIR / f"{name}.toml").read_text())
    return Recipe(
        name=data["name"], description=data["description"], architecture=data["architecture"],
        source=data["source"], config=data.get("config", {}), dhsa=data.get("dhsa", {}),
    )

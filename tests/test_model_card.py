"""Every SFT and GRPO output folder carries a model card; --push_to_hub uploads it through the trainer.

The card is checked for what a user needs (base model, data and licences, recipe, rewards and
weights, dual check and evaluation when run, how to load it). The push runs the trainer's own
``push_to_hub`` with the Hub client replaced by a recorder (no network): what would be uploaded is
read from the folder at upload time.
"""

from __future__ import annotations

import json
import re
import types
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import yaml

from cellduality.train.model_card import CARD, DATA_LICENCES, refresh, render_card

REPO = Path(__file__).resolve().parents[1]
SFT_RECIPE = REPO / "recipes" / "tiny-cpu" / "sft.yaml"

RUN_META = {
    "prepared": {
        "dataset": "pbmc68k+scad_plx4720",
        "tasks": ["annotation", "drug_sensitivity"],
        "parts": {"pbmc68k": {"dataset": "pbmc68k"}, "scad_plx4720": {"dataset": "scad_plx4720"}},
    },
    "sentences": {"pbmc68k": {"top_k": 100, "n_genes": 100}, "scad_plx4720": {"top_k": 100, "n_genes": 100}},
    "reward_mode": "self_supervised",
}


def _front(text: str) -> dict[str, Any]:
    assert text.startswith("---\n")
    return yaml.safe_load(text[4 : text.index("\n---", 4)])


def test_card_says_what_a_user_needs(tmp_path) -> None:
    model_dir = tmp_path / "grpo_dual"
    checks = tmp_path / "dual_check_out"
    checks.mkdir()
    (checks / "dual_check.json").write_text(
        json.dumps(
            {
                "model": str(model_dir),
                "checks": [
                    {"dataset": "pbmc68k", "task": "annotation", "split": "test", "verdict": "carries signal"}
                ],
            }
        )
    )
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text(
        json.dumps(
            {
                "run": {"models": [{"name": "GRPO", "path": str(model_dir)}]},
                "tasks": {
                    "annotation": {
                        "methods": {
                            "GRPO": {"kind": "model", "metrics": {"accuracy": 0.81}},
                            "majority": {"kind": "baseline", "metrics": {"accuracy": 0.31}},
                            "kNN": {"kind": "baseline", "metrics": {"accuracy": 0.62}},
                        }
                    }
                },
            }
        )
    )
    text = render_card(
        model_dir,
        "grpo",
        RUN_META,
        {"learning_rate": 1e-6, "num_generations": 8, "beta": 0.0},
        "meta-llama/Llama-3.2-3B-Instruct",
        "outputs/llama-3.2-3b/sft",
        [("format", 0.1), ("dual", 1.0)],
        hub_model_id="me/cellduality-grpo",
        dual_check=checks,
        evaluation=evaluation,
    )
    front = _front(text)
    assert (
        front["base_model"] == "meta-llama/Llama-3.2-3B-Instruct" and front["library_name"] == "transformers"
    )
    assert "grpo" in front["tags"]
    assert "| pbmc68k | BSD-3-Clause |" in text and "| scad_plx4720 | Apache-2.0 |" in text
    assert "| `learning_rate` | 1e-06 |" in text and "| `num_generations` | 8 |" in text
    assert "| `format` | 0.1 |" in text and "| `dual` | 1 |" in text and "`self_supervised`" in text
    assert "| pbmc68k | annotation | test | carries signal |" in text
    assert "| annotation | accuracy | 0.810 | 0.620 |" in text  # the best baseline, not the weakest
    assert "cellduality predict --task annotation --model me/cellduality-grpo" in text


def test_refresh_adds_the_checks_to_an_existing_card(tmp_path) -> None:
    model_dir = tmp_path / "sft"
    model_dir.mkdir()
    (model_dir / CARD).write_text(render_card(model_dir, "sft", RUN_META, {"learning_rate": 1e-5}, "b/m"))
    assert "Not run for this card." in (model_dir / CARD).read_text()
    (tmp_path / "dc.json").write_text(
        json.dumps(
            {"checks": [{"dataset": "d", "task": "generation", "split": "test", "verdict": "no signal"}]}
        )
    )
    refresh(model_dir, tmp_path / "dc.json", None)
    text = (model_dir / CARD).read_text()
    assert "| d | generation | test | no signal |" in text and text.count("## How to use") == 1
    assert _front(text)["base_model"] == "b/m"


def test_data_licences_match_the_sources_table() -> None:
    sources = (REPO / "cellduality" / "data" / "resources" / "SOURCES.md").read_text()
    for line in sources.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 3 and cells[2].startswith("`") and cells[2].strip("`") in DATA_LICENCES:
            name = cells[2].strip("`")
            assert cells[-2].startswith(DATA_LICENCES[name]), (name, cells[-2])
    from cellduality.data.embedded import EMBEDDED

    assert set(EMBEDDED) == set(DATA_LICENCES)
    assert re.search(r"pbmc68k.*BSD-3-Clause", sources.replace("\n", " "))


class _Hub:
    """Records what the trainer's push would upload (the Hub client ``transformers`` calls)."""

    def __init__(self) -> None:
        self.repos: list[str] = []
        self.uploads: list[dict[str, Any]] = []

    def create_repo(self, repo_id: str, **kwargs: Any) -> Any:
        self.repos.append(repo_id)
        return types.SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id: str, folder_path: str, **kwargs: Any) -> Any:
        folder = Path(folder_path)
        files = {p.name: p for p in folder.iterdir() if p.is_file()}
        card = files.get(CARD)
        self.uploads.append(
            {
                "repo_id": repo_id,
                "files": sorted(files),
                "card": card.read_text() if card else None,
                "message": kwargs.get("commit_message"),
            }
        )
        done: Future = Future()
        done.set_result(None)
        return done


def test_sft_writes_a_card_and_pushes_it_through_the_trainer(tmp_path, monkeypatch) -> None:
    from cellduality.train.sft import parse_args, run_sft

    hub = _Hub()
    monkeypatch.setattr("transformers.trainer.hf_api", lambda: hub)
    run_sft(
        *parse_args(
            [
                "--config",
                str(SFT_RECIPE),
                "--output_dir",
                str(tmp_path / "sft"),
                "--prepared_dir",
                str(tmp_path / "prepared"),
                "--model_name_or_path",
                str(tmp_path / "model"),
                "--max_steps",
                "1",
                "--save_strategy",
                "no",
                "--push_to_hub",
                "true",
                "--hub_model_id",
                "me/cellduality-tiny-sft",
            ]
        )
    )
    card = (tmp_path / "sft" / CARD).read_text()
    assert "## Data and licences" in card and "| pbmc68k | BSD-3-Clause |" in card
    assert "cellduality predict --task annotation --model me/cellduality-tiny-sft" in card
    assert hub.repos == ["me/cellduality-tiny-sft"]
    last = hub.uploads[-1]  # the end-of-training push: weights, tokenizer, run metadata and our card
    assert last["repo_id"] == "me/cellduality-tiny-sft"
    assert {"cellduality_run.json", CARD, "config.json"} <= set(last["files"])
    assert last["card"] == card  # not TRL's draft card


def test_grpo_card_names_the_sft_base_and_the_weighted_rewards(tmp_path) -> None:
    """A GRPO run starts from a local SFT folder: its card names the base model the SFT card names."""
    from cellduality.train.model_card import card_from_trainer

    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / CARD).write_text(render_card(sft, "sft", RUN_META, {}, "meta-llama/Llama-3.2-3B-Instruct"))
    out = tmp_path / "grpo"
    out.mkdir()
    (out / "cellduality_run.json").write_text(json.dumps(RUN_META))
    args = types.SimpleNamespace(
        learning_rate=1e-6, num_generations=8, beta=0.0, reward_weights=[0.1, 1.0], hub_model_id=None
    )
    cd_args = types.SimpleNamespace(
        reward_funcs=["format", "dual"], dual_max_new_tokens=512, dual_do_sample=False
    )
    text = card_from_trainer(
        types.SimpleNamespace(args=args),
        "grpo",
        cd_args,
        types.SimpleNamespace(model_name_or_path=str(sft)),
        out,
    )
    assert _front(text)["base_model"] == "meta-llama/Llama-3.2-3B-Instruct"
    assert f"(loaded from `{sft}`)" in text
    assert (
        "| `format` | 0.1 |" in text
        and "| `dual` | 1 |" in text
        and "| `dual_max_new_tokens` | 512 |" in text
    )

"""The tiny offline model and its gene-symbol tokenizer (cellduality.modeling).

What matters to the rest of the package: gene symbols are single tokens, a completion survives
encode -> decode and parses again (TRL decodes with ``skip_special_tokens=True``), the chat template works
for SFT and generation, and the saved directory reloads offline with the Auto classes.
"""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from cellduality.modeling.tokenizer import (
    CHAT_TEMPLATE,
    PIECE_PATTERN,
    SPECIAL_TOKENS,
    TAG_TOKENS,
    build_tokenizer,
    split_pieces,
    vocabulary_from,
    words_from,
)
from cellduality.parsing import gene_vocabulary, parse_completion, parse_genes, parse_label

GENES = ["HLA-DRB1", "RP11-34P13.7", "MT-CO1", "KLF1", "HBB", "GATA1", "CD3E", "AC092620.1", "TRBV20/OR9-2"]
LABELS = ["CD4-positive, alpha-beta T cell", "erythroid cell", "natural killer cell"]
SYSTEM = "You are a biologist. Reason inside <think></think>, then answer inside <answer></answer>."
USER = (
    "Cell sentence (top genes first): HBB KLF1 GATA1 MT-CO1.\n"
    "Candidates: CD4-positive, alpha-beta T cell; erythroid cell; natural killer cell.\n"
    "Which cell type is it?"
)
THINKING = "<think>HBB and KLF1 are high, so the cell is erythroid.</think>"
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [MESSAGES, THINKING, *LABELS]
    return build_tokenizer(GENES, texts)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from cellduality.modeling.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("tiny") / "model"
    return build_tiny_model(out, GENES, [MESSAGES, THINKING, *LABELS], max_position_embeddings=256)


def test_gene_symbols_are_single_tokens(tokenizer):
    text = " ".join(GENES)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])
    assert [t.strip() for t in tokens] == GENES
    assert tokenizer.unk_token not in tokens


@pytest.mark.parametrize(
    ("text", "pieces"),
    [
        ("KLF1, HBB.", ["KLF1", ",", " HBB", "."]),
        ("Cell type: erythroid", ["Cell", " type", ":", " erythroid"]),
        ("<answer>KLF1 HBB</answer>", ["<answer>", "KLF1", " HBB", "</answer>"]),
        ("</think> <answer>", ["</think>", " ", "<answer>"]),
        ("(RP11-34P13.7)", ["(", "RP11-34P13.7", ")"]),
        ("a\n\nb", ["a", "\n", "\n", "b"]),
    ],
)
def test_pieces_split_punctuation_but_not_symbols(text, pieces):
    assert split_pieces(text) == pieces


def test_python_pattern_matches_saved_pre_tokenizer():
    """``split_pieces`` (used to harvest the vocabulary) must cut exactly like the serialised pre-tokenizer."""
    from tokenizers import Regex, pre_tokenizers

    pre = pre_tokenizers.Split(Regex(PIECE_PATTERN), behavior="isolated")
    alphabet = [*"aZ19-./_,;:!?()[]{}\"'`<> \n\té", "<think>", "</answer>", "HLA-DRB1", "  "]
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25)))
        expected = [piece for piece, _ in pre.pre_tokenize_str(text)]
        assert split_pieces(text) == expected, text
        assert "".join(expected) == text


@pytest.mark.parametrize("label", LABELS)
def test_label_completion_round_trip_parses(tokenizer, label):
    completion = f"{THINKING}\n<answer>{label}</answer>"
    ids = tokenizer(completion)["input_ids"] + [tokenizer.eos_token_id]
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded == completion
    parsed = parse_completion(decoded)
    assert parsed.well_formed
    assert parse_label(decoded, LABELS) == label


def test_gene_completion_round_trip_parses(tokenizer):
    completion = f"{THINKING}<answer>KLF1 HBB GATA1 RP11-34P13.7 HLA-DRB1</answer>"
    ids = tokenizer(completion)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert decoded == completion
    vocab = gene_vocabulary(GENES)
    assert parse_genes(decoded, vocab) == ["KLF1", "HBB", "GATA1", "RP11-34P13.7", "HLA-DRB1"]


def test_tags_are_single_non_special_tokens(tokenizer):
    for tag in TAG_TOKENS:
        ids = tokenizer(tag)["input_ids"]
        assert len(ids) == 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == tag
    assert not set(TAG_TOKENS) & set(tokenizer.all_special_tokens)


def test_unknown_words_map_to_unk(tokenizer):
    ids = tokenizer("KLF1 NOTAGENE HBB")["input_ids"]
    assert ids[1] == tokenizer.unk_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "KLF1 HBB"


def test_special_tokens_and_ids(tokenizer):
    assert tokenizer.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == list(SPECIAL_TOKENS)
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.padding_side == "left"
    assert tokenizer("KLF1")["input_ids"] == [tokenizer.convert_tokens_to_ids("KLF1")]  # no automatic bos/eos


def test_vocabulary_is_deterministic_and_has_both_spacings():
    texts = [MESSAGES, "reasoning: KLF1 (high)."]
    first = vocabulary_from(GENES, texts)
    assert first == vocabulary_from(list(reversed(GENES)), list(reversed(texts)))
    assert len(first) == len(set(first))
    for word in ("KLF1", "reasoning", "Candidates", "("):
        assert word in first
        assert f" {word}" in first
    assert {"Cell", "sentence", "biologist"} <= words_from([MESSAGES])


def test_chat_template_renders_and_adds_generation_prompt(tokenizer):
    assert tokenizer.chat_template == CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<s><|system|>\n" + SYSTEM + "</s>\n<|user|>\n")
    assert text.endswith("</s>\n<|assistant|>\n")
    no_prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert not no_prompt.endswith("<|assistant|>\n")
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_chat_template_masks_assistant_answer_and_eos(tokenizer):
    """TRL's assistant_only_loss needs {% generation %}; the mask must end on </s> so the model learns to stop."""
    answer = f"{THINKING}<answer>erythroid cell</answer>"
    out = tokenizer.apply_chat_template(
        [*MESSAGES, {"role": "assistant", "content": answer}],
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(masked) == answer + "</s>"


def test_chat_template_rejects_unknown_role(tokenizer):
    with pytest.raises(Exception, match="Unknown chat role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_saved_model_reloads_offline_and_generates(tiny_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, local_files_only=True)
    assert model.config.model_type == "llama"
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (64, 2)
    assert model.config.vocab_size == len(tok)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert tok.chat_template == CHAT_TEMPLATE

    short = [{"role": "user", "content": "Which cell type is it?"}]
    prompts = [
        tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in (MESSAGES, short)
    ]
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] <= batch["input_ids"].shape[1] + 6
    assert all(isinstance(t, str) for t in tok.batch_decode(out[:, batch["input_ids"].shape[1] :]))


def test_build_is_seeded_and_leaves_global_rng_alone(tmp_path, tiny_dir):
    import torch
    from safetensors.torch import load_file

    from cellduality.modeling.tiny import build_tiny_model

    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    again = build_tiny_model(
        tmp_path / "again", GENES, [MESSAGES, THINKING, *LABELS], max_position_embeddings=256
    )
    assert torch.equal(torch.rand(1), before)
    a, b = load_file(tiny_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ensure_tiny_model_builds_only_when_missing(tmp_path):
    from cellduality.modeling.tiny import MARKER_FILE, ensure_tiny_model, is_tiny_model_dir

    target = tmp_path / "cache" / "tiny"
    assert ensure_tiny_model(target, GENES[:3], ["a b"]) == target
    assert is_tiny_model_dir(target)
    stamp = (target / MARKER_FILE).stat().st_mtime_ns
    ensure_tiny_model(target, ["OTHER"], ())
    assert (target / MARKER_FILE).stat().st_mtime_ns == stamp  # complete: not rebuilt
    assert [p.name for p in target.parent.iterdir()] == ["tiny"]  # no temporary directories left
    empty = tmp_path / "empty"
    empty.mkdir()
    assert is_tiny_model_dir(ensure_tiny_model(empty, GENES[:3], ["a b"]))  # an empty folder is fine


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("content", ["checkpoint", "user files", "incomplete tiny model"])
def test_ensure_tiny_model_never_deletes_what_is_there(tmp_path, content):
    """A folder holding anything but a complete tiny model is refused and left byte for byte as it was."""
    from cellduality.modeling.tiny import TinyModelRefused, ensure_tiny_model

    target = tmp_path / "model"
    if content == "incomplete tiny model":
        ensure_tiny_model(target, GENES[:3], ["a b"])
        (target / "model.safetensors").unlink()
    else:
        target.mkdir()
        if content == "checkpoint":
            (target / "config.json").write_text("{}")
            (target / "model.safetensors").write_bytes(b"trained weights")
        (target / "notes.txt").write_text("my results")
        (target / "sub").mkdir()
        (target / "sub" / "data.csv").write_text("1,2\n")
    before = _snapshot(target)
    with pytest.raises(TinyModelRefused, match="nothing there is deleted"):
        ensure_tiny_model(target, GENES[:3], ["a b"])
    assert _snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # our temporary build is gone too
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(TinyModelRefused, match="is a file"):
        ensure_tiny_model(a_file, GENES[:3], ["a b"])
    assert a_file.read_text() == "x"


def test_packages_import_lightly():
    """``import cellduality.modeling`` / ``cellduality.train`` must not pull in torch (CLI start-up time)."""
    code = (
        "import sys, cellduality.modeling, cellduality.train\n"
        "heavy = {'torch', 'transformers', 'trl', 'tokenizers'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "assert callable(cellduality.modeling.build_tiny_model)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_tiny_model_command(tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cellduality.cli import main

    out = tmp_path / "tiny"
    assert main(["tiny-model", "--out", str(out), "--dataset", "scad_plx4720", "--top-k", "8"]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("BDKRB1") != tok.unk_token_id
    assert AutoModelForCausalLM.from_pretrained(out).config.hidden_size == 64


def test_tiny_model_command_refuses_a_folder_with_files(tmp_path, capsys) -> None:
    from cellduality.cli import main

    out = tmp_path / "checkpoint"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"trained")
    assert main(["tiny-model", "--out", str(out), "--dataset", "scad_plx4720", "--top-k", "8"]) == 2
    err = capsys.readouterr().err
    assert "refusing to build the tiny model" in err and "Traceback" not in err
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"trained"

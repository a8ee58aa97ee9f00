#!/usr/bin/env python3
"""Render the chat-template table test's reference outputs with Hugging Face transformers.

How to run (from anywhere; needs python3 >= 3.10 and PyPI access the first time):

    python3 scripts/chat-templates.py            # (re)write tests/fixtures/chat_templates/expected/*.json
    python3 scripts/chat-templates.py --check    # render again and fail if the committed files differ

The script bootstraps its own reference virtualenv at target/chat-template-venv (created on first
run, pinned versions below, no torch) and re-executes itself under that venv's python.

Inputs (committed):
    tests/fixtures/chat_templates/templates/<name>.json
        {"model", "source", "chat_template", "bos_token", "eos_token"}: the models' real chat
        templates, copied verbatim (see each file's "source").
    tests/fixtures/chat_templates/conversations.json
        [{"name", "messages": [{"role", "content"}], "add_generation_prompt"}]
Outputs:
    tests/fixtures/chat_templates/expected/<name>.json
        {"transformers": "<version>", "renderings": {"<conversation>": {"text": ...} | {"error": ...}}}

For every template a tokenizer is built from a tiny WordLevel `tokenizers.Tokenizer` that only
knows the special tokens, wrapped in `transformers.PreTrainedTokenizerFast(tokenizer_object=...,
bos_token=..., eos_token=..., chat_template=...)`, and each conversation goes through the real
`tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` with no other
arguments, so templates use their own defaults (e.g. Llama 3.1's fixed "26 Jul 2024"
date_string). A template that raises (Gemma refuses a system role, Mistral and Gemma require
user/assistant alternation) is recorded as {"error": str(exception)}.

Templates that call strftime_now() would make the output depend on today's date, so the script
refuses them rather than write a non-deterministic fixture.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

# Exact versions used to generate the committed expected/*.json (Python 3.11.7, Linux x86_64).
PINS = {
    "transformers": "5.24.0",
    "tokenizers": "0.23.3",
    "jinja2": "3.1.6",
}

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "target" / "chat-template-venv"
FIXTURES = ROOT / "tests" / "fixtures" / "chat_templates"
TEMPLATES = FIXTURES / "templates"
CONVERSATIONS = FIXTURES / "conversations.json"
EXPECTED = FIXTURES / "expected"


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def installed_versions(python: Path) -> dict:
    code = (
        "import json, importlib.metadata as m\n"
        f"names = {sorted(PINS)!r}\n"
        "out = {}\n"
        "for n in names:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: out[n] = None\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout)


def bootstrap() -> None:
    """Make sure the pinned venv exists, then re-exec this script under it."""
    python = venv_python()
    if not python.exists():
        print(f"creating virtualenv at {VENV}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    have = installed_versions(python)
    missing = [f"{n}=={v}" for n, v in sorted(PINS.items()) if (have.get(n) or "").lower() != v]
    if missing:
        print(f"installing {' '.join(missing)} into {VENV}", file=sys.stderr)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--progress-bar", "off", *missing], check=True
        )
    env = dict(os.environ, CHAT_TEMPLATES_IN_VENV="1")
    os.execve(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]], env)


def in_venv() -> bool:
    try:
        return Path(sys.prefix).resolve() == VENV.resolve()
    except OSError:
        return False


def build_tokenizer(spec: dict):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0}
    for tok in (spec["bos_token"], spec["eos_token"]):
        if tok is not None and tok not in vocab:
            vocab[tok] = len(vocab)
    inner = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=inner,
        bos_token=spec["bos_token"],
        eos_token=spec["eos_token"],
        chat_template=spec["chat_template"],
    )


def render_all() -> dict:
    import transformers

    conversations = json.loads(CONVERSATIONS.read_text(encoding="utf-8"))
    names = [c["name"] for c in conversations]
    if len(set(names)) != len(names):
        raise SystemExit(f"duplicate conversation names in {CONVERSATIONS}")

    outputs = {}
    for path in sorted(TEMPLATES.glob("*.json")):
        spec = json.loads(path.read_text(encoding="utf-8"))
        if "strftime_now" in spec["chat_template"]:
            raise SystemExit(
                f"{path.name}: the template calls strftime_now(), so its rendering depends on today's date; "
                "refusing to write a non-deterministic fixture"
            )
        tok = build_tokenizer(spec)
        renderings = {}
        for conv in conversations:
            try:
                text = tok.apply_chat_template(
                    conv["messages"], tokenize=False, add_generation_prompt=conv["add_generation_prompt"]
                )
                renderings[conv["name"]] = {"text": text}
            except Exception as exc:  # the template's raise_exception() or any other failure
                renderings[conv["name"]] = {"error": str(exc)}
        doc = {"transformers": transformers.__version__, "renderings": renderings}
        outputs[path.stem] = json.dumps(doc, indent=1, ensure_ascii=False, sort_keys=True) + "\n"
    return outputs


def main() -> int:
    if not in_venv() and os.environ.get("CHAT_TEMPLATES_IN_VENV") != "1":
        bootstrap()  # does not return

    check = "--check" in sys.argv[1:]
    outputs = render_all()
    stale = sorted(
        p.name for p in EXPECTED.glob("*.json") if p.stem not in outputs
    ) if EXPECTED.exists() else []
    if check:
        bad = [
            name
            for name, text in outputs.items()
            if not (EXPECTED / f"{name}.json").exists()
            or (EXPECTED / f"{name}.json").read_text(encoding="utf-8") != text
        ]
        bad += stale
        if bad:
            print(f"chat-template fixtures out of date: {', '.join(bad)}", file=sys.stderr)
            return 1
        print(f"chat-template fixtures up to date ({len(outputs)} templates)")
        return 0
    EXPECTED.mkdir(parents=True, exist_ok=True)
    for name in stale:
        (EXPECTED / name).unlink()
    for name, text in outputs.items():
        (EXPECTED / f"{name}.json").write_text(text, encoding="utf-8")
        print(f"wrote {(EXPECTED / f'{name}.json').relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A model folder's chat template, rendered the way transformers and vLLM render it.

An OpenAI-compatible server (vLLM, llama.cpp's server, text-generation-inference) does not feed a
chat request's messages to the model as plain text: it renders them with the model's own chat
template (Jinja) — role markers, a system prompt, the generation prompt that opens the
assistant's turn — and tokenises the result with ``add_special_tokens=False`` (the template writes
any BOS itself).  ``quantseal serve`` does the same on ``/v1/chat/completions``, so a customer's
export served by quantseal answers a chat exactly as it would behind vLLM, and a board trained on
the chat template (``board train --chat-template``) is read through it.

Where the template comes from (:func:`load_chat_template`), first found wins:

1. an explicit file: a ``.jinja`` file, or a ``tokenizer_config.json`` holding ``chat_template``;
2. the model folder's ``chat_template.jinja`` (what transformers ≥ 4.50 saves);
3. the model folder's ``tokenizer_config.json`` ``chat_template``: a string, or a list of named
   templates of which ``default`` is used (transformers' format).

``bos_token`` / ``eos_token`` (strings, or ``{"content": ...}`` objects) come from that
``tokenizer_config.json`` when it has them, as transformers passes them to the template.  Rendering
is sandboxed (:class:`jinja2.sandbox.ImmutableSandboxedEnvironment`, ``trim_blocks`` and
``lstrip_blocks``) with transformers' globals ``raise_exception`` and ``strftime_now``.  jinja2 is
not a core dependency of the runtime (it comes with torch; ``pip install jinja2`` elsewhere): it is
imported only when a template is found.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from ..errors import BadInput

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"


def _special(value) -> str:
    """A special token as tokenizer_config.json stores it: a string or ``{"content": str, ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise BadInput(f"{path}: expected a JSON object")
    return obj


def _template_of(cfg: dict) -> str | None:
    tpl = cfg.get("chat_template")
    if isinstance(tpl, list):  # named templates: the default one
        tpl = next((t.get("template") for t in tpl if isinstance(t, dict) and t.get("name") == "default"), None)
    return tpl if isinstance(tpl, str) and tpl.strip() else None


class ChatTemplate:
    """A compiled chat template; :meth:`render` turns OpenAI ``messages`` into the prompt text."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", origin: str = ""):
        try:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as exc:  # pragma: no cover - jinja2 ships with torch and transformers
            raise BadInput(f"{origin or 'the model'} has a chat template, which needs jinja2 "
                           "(pip install jinja2; --chat-template none serves without it)") from exc
        self.source, self.bos_token, self.eos_token, self.origin = source, bos_token, eos_token, origin
        self._error = TemplateError
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg):
            raise TemplateError(msg)

        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise BadInput(f"{origin or 'chat template'}: not a valid Jinja template ({exc})") from exc

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` ([{"role", "content"}, ...]); ``ValueError`` with the
        template's own message when it refuses them (e.g. roles that do not alternate)."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except self._error as exc:
            raise ValueError(f"the chat template refuses these messages ({exc})") from exc
        except (TypeError, KeyError, AttributeError) as exc:  # a template reading fields the request lacks
            raise ValueError(f"the chat template cannot render these messages ({type(exc).__name__}: {exc})") from exc


def load_chat_template(folder: str | Path, explicit: str | Path | None = None) -> ChatTemplate | None:
    """The chat template for the model whose files are in ``folder`` (module docstring), or
    ``None`` when it has none.  ``explicit``: a ``.jinja`` file or a ``tokenizer_config.json``
    that takes precedence; a missing or empty one is :class:`BadInput`."""
    folder = Path(folder)
    cfg_path = folder / TOKENIZER_CONFIG
    cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise BadInput(f"{path}: no such chat template file")
        if path.suffix == ".json":
            cfg = _read_json(path)
            source = _template_of(cfg)
            if source is None:
                raise BadInput(f"{path}: no chat_template in it")
        else:
            try:
                source = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise BadInput(f"{path}: not a readable text file ({exc})") from exc
            if not source.strip():
                raise BadInput(f"{path}: empty chat template")
        origin = str(path)
    elif (folder / TEMPLATE_FILE).is_file():
        origin = str(folder / TEMPLATE_FILE)
        try:
            source = (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise BadInput(f"{origin}: not a readable text file ({exc})") from exc
    else:
        source, origin = _template_of(cfg), str(cfg_path)
        if source is None:
            return None
    return ChatTemplate(source, _special(cfg.get("bos_token")), _special(cfg.get("eos_token")), origin)

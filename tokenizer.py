"""The tokenizer of a Hugging Face folder: tokenizer.json through the `tokenizers` package, the chat template
rendered with jinja2 the way `transformers` renders it, and the stop ids from generation_config.json."""
import json
import os
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer as _HFTokenizer


def _token_str(t):
    # tokenizer_config.json writes special tokens either as strings or as AddedToken dicts.
    return t.get("content") if isinstance(t, dict) else t


def _read(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


class Tokenizer:
    def __init__(self, path):
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tj):
            raise FileNotFoundError(f"{path} has no tokenizer.json (only fast tokenizers are supported)")
        self.tk = _HFTokenizer.from_file(tj)
        cfg = _read(os.path.join(path, "tokenizer_config.json")) or {}
        self.special = {k: _token_str(cfg[k]) for k in
                        ("bos_token", "eos_token", "unk_token", "pad_token") if cfg.get(k)}
        template = cfg.get("chat_template")
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.exists(jinja_file):  # newer transformers keep the template beside the config
            with open(jinja_file) as f:
                template = f.read()
        if isinstance(template, list):  # named templates: take the default one
            template = {t["name"]: t["template"] for t in template}.get("default")
        self.chat_template = template
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        self.eos_id = self.token_id(self.special.get("eos_token"))
        self.bos_id = self.token_id(self.special.get("bos_token"))
        pad = self.token_id(self.special.get("pad_token"))
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        stop = []
        gen = _read(os.path.join(path, "generation_config.json")) or {}
        eos = gen.get("eos_token_id")
        stop += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        if self.eos_id is not None:
            stop.append(self.eos_id)
        self.stop_ids = sorted(set(stop))

    def token_id(self, token):
        return None if token is None else self.tk.token_to_id(token)

    def encode(self, text: str, add_special_tokens=False) -> list[int]:
        # Chat-templated text already holds its special tokens, as in transformers' apply_chat_template.
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens=True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt=True) -> str:
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json / chat_template.jinja)")
        return _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
            **self.special)


_compiled = {}


def _compile(template):
    # The environment `transformers` renders chat templates in: sandboxed, trim/lstrip blocks, loop controls,
    # its own tojson (no HTML escaping) and the two helpers templates call.
    if template not in _compiled:
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=[jinja2.ext.loopcontrols])

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _compiled[template] = env.from_string(template)
    return _compiled[template]

"""The Ollama `Modelfile` next to an exported GGUF: `ollama create NAME -f Modelfile` works as it stands.

The TEMPLATE is newslora's own prompt (`render_prompt`, the one training used) with the article where
Ollama puts the user's message (`{{ .Prompt }}`), so `ollama run NAME "article text"` sees exactly the
prompt the adapter was trained on.
"""
from __future__ import annotations

from workers.modeling.prompts import render_prompt

_ARTICLE = "\x00NEWSLORA_ARTICLE\x00"


def go_template_literal(text: str) -> str:
    """`text` as literal Go-template text: a `{{` in it would otherwise start an action."""
    return text.replace("{{", '{{ "{{" }}')


def ollama_template(instruction: str, template: str, tokenizer=None) -> str:
    """The Go template rendering newslora's prompt with Ollama's `{{ .Prompt }}` as the article."""
    prompt = render_prompt(instruction, _ARTICLE, template=template, tokenizer=tokenizer)
    before, after = prompt.split(_ARTICLE, 1)
    return go_template_literal(before) + "{{ .Prompt }}" + go_template_literal(after)


def stop_strings(template: str, tokenizer=None) -> list[str]:
    """Where a response ends: the alpaca template's next section marker, and the tokenizer's EOS text."""
    stops = ["###"] if template == "alpaca" else []
    eos = getattr(tokenizer, "eos_token", None)
    if eos:
        stops.append(eos)
    if template == "chat" and tokenizer is not None and "<|im_end|>" in tokenizer.get_vocab():
        stops.append("<|im_end|>")
    return list(dict.fromkeys(stops))


def render_modelfile(gguf_name: str, *, instruction: str, template: str, label_names: list[str],
                     tokenizer=None, num_ctx: int | None = None, adapter_id: int | None = None,
                     base_model: str | None = None) -> str:
    """The Modelfile text. `gguf_name` is the GGUF file's name, in the same folder as the Modelfile."""
    tmpl = ollama_template(instruction, template, tokenizer)
    if '"""' in tmpl:
        raise ValueError('the prompt contains """, which cannot be written inside a Modelfile TEMPLATE block')
    lines = [
        f"# newslora export of adapter {adapter_id} on {base_model}" if adapter_id is not None else "# newslora export",
        f"# labels: {', '.join(label_names)}",
        "# The model answers with exactly one of the labels above. Create and run it with:",
        "#   ollama create NAME -f Modelfile",
        '#   ollama run NAME "Stocks rallied as the Fed held rates"',
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{tmpl}"""',
    ]
    lines += [f'PARAMETER stop "{s}"' for s in stop_strings(template, tokenizer)]
    lines += ["PARAMETER temperature 0",  # newslora's generate mode is greedy by default
              "PARAMETER num_predict 16"]  # a label is a few tokens (newslora's max_new_tokens default)
    if num_ctx:
        lines.append(f"PARAMETER num_ctx {num_ctx}")
    return "\n".join(lines) + "\n"

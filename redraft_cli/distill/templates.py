"""Chat templates a recipe can name for targets whose tokenizer has none (e.g. Vicuna v1.3)."""

from __future__ import annotations

from typing import Any

VICUNA = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}{% set loop_messages = messages[1:] %}"
    "{% else %}{{ 'A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user\\'s questions. ' }}{% set loop_messages = messages %}{% endif %}"
    "{% for m in loop_messages %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

NAMED = {"vicuna": VICUNA}


def apply_chat_template_override(target: Any, recipe: Any) -> None:
    """Set the tokenizer's chat template from the recipe (a name from NAMED or a Jinja string)."""
    template = getattr(recipe.target, "chat_template", None)
    if template:
        target.tokenizer.chat_template = NAMED.get(template, template)

"""Chat templates judged on Jinja2's own syntax tree: real templates stay safe (and render in
transformers), every spelling of an escape is caught (and reaches Python in a plain
``jinja2.Environment``, which llama.cpp-style engines and older servers resemble, while
Jinja's sandbox blocks it), and each attack has a benign twin that stays safe."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pytest
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

import modelport
from modelport.scanning import templates

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
LLAMA3 = r"""{{- bos_token }}
{%- if custom_tools is defined %}{%- set tools = custom_tools %}{%- endif %}
{%- if not tools_in_user_message is defined %}{%- set tools_in_user_message = true %}{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}{{- "Environment: ipython\n" }}{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\n\n" }}{%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call.\n\n" }}
    {%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\n\n" }}{%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}
"""  # noqa: E501 (real templates keep their long lines)
QWEN25_TOOLS = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}
    {%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}{%- endif %}
    {{- "\n\n# Tools\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}{{- "\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\n</tools><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}{{- '\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}{{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' }}{{- message.content }}{{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""  # noqa: E501 (real templates keep their long lines)
HERMES_MACROS = r"""{%- macro json_to_python_type(json_spec) %}
{%- set basic_type_map = {"string": "str", "number": "float", "integer": "int", "boolean": "bool"} %}
{%- if basic_type_map[json_spec.type] is defined %}{{- basic_type_map[json_spec.type] }}
{%- elif json_spec.type == "array" %}{{- "list[" +  json_to_python_type(json_spec|items) + "]"}}
{%- elif json_spec.type == "object" %}
    {%- if json_spec.additionalProperties is defined %}
        {{- "dict[str, " + json_to_python_type(json_spec.additionalProperties) + ']'}}
    {%- else %}{{- "dict" }}{%- endif %}
{%- elif json_spec.type is iterable %}
    {{- "Union[" }}
    {%- for t in json_spec.type %}
        {{- json_to_python_type({"type": t}) }}{%- if not loop.last %}{{- "," }}{%- endif %}
    {%- endfor %}
    {{- "]" }}
{%- else %}{{- "Any" }}{%- endif %}
{%- endmacro %}
{{- bos_token }}{{- "<|im_start|>system\nYou are a function calling AI model. <tools> " }}
{%- for tool in tools %}
    {%- if tool.function is defined %}{%- set tool = tool.function %}{%- endif %}
    {{- '{"type": "function", "function": ' }}{{- '"name": "' + tool.name + '", ' }}
    {{- '"description": "' + tool.name + '(' }}
    {%- for param_name, param_fields in tool.parameters.properties|items %}
        {{- param_name + ": " + json_to_python_type(param_fields) }}
        {%- if not loop.last %}{{- ", " }}{%- endif %}
    {%- endfor %}
    {{- ")" }}
    {%- if tool.return is defined %}{{- " -> " + json_to_python_type(tool.return) }}{%- endif %}
    {{- " - " + tool.description + "\n\n" }}
    {%- for param_name, param_fields in tool.parameters.properties|items %}
        {%- if loop.first %}{{- "    Args:\n" }}{%- endif %}
        {{- "        " + param_name + "(" + json_to_python_type(param_fields) + "): " + param_fields.description|trim }}
    {%- endfor %}
    {{- '"' }}{{- "}" }}
{%- endfor %}
{{- " </tools><|im_end|>\n" }}
{%- for message in messages %}
    {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""  # noqa: E501 (real templates keep their long lines)
MISTRAL_TOOLS = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}{{- '"' + key + '": "' + val + '"' }}
                    {%- else %}{{- '"' + key + '": ' + val|tojson }}{%- endif %}
                    {%- if not loop.last %}{{- ", " }}{%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}{{- ", " }}{%- else %}{{- "]" }}{%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}{{- ", " }}{%- else %}{{- "]" + eos_token }}{%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported!") }}
    {%- endif %}
{%- endfor %}
"""  # noqa: E501 (real templates keep their long lines)
QWEN3_THINKING = r"""{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}{%- set content = message.content %}{%- else %}{%- set content = '' %}{%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}
"""  # noqa: E501 (real templates keep their long lines)
GEMMA_GENERATION = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' }}{% if role == 'model' %}{% generation %}"
    "{{ message['content'] | trim }}{% endgeneration %}{% else %}"
    "{{ message['content'] | trim }}{% endif %}{{ '<end_of_turn>\\n' }}"
    "{% if loop.index0 > 4 %}{% break %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>add</think>4"},
    {"role": "user", "content": "Thanks"},
]
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city"}},
            "required": ["city"],
        },
    },
}
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "abcdefghi",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "abcdefghi", "content": "sunny"},
    {"role": "user", "content": "And tomorrow?"},
]
ANSWERED = [*TOOL_CHAT[:3], {"role": "assistant", "content": "Sunny."}, TOOL_CHAT[3]]
# name -> (template, chat, tools, what its rendering must contain)
REAL: dict[str, tuple[str, list[dict[str, Any]], list[dict[str, Any]] | None, str]] = {
    "chatml": (CHATML, CHAT, None, "<|im_start|>assistant\n"),
    "llama-2": (LLAMA2, CHAT[:2], None, "[INST] <<SYS>>\nBe brief."),
    "llama-3": (LLAMA3, TOOL_CHAT[:1], [TOOL], '"name": "get_weather"'),
    "qwen2.5-tools": (QWEN25_TOOLS, TOOL_CHAT, [TOOL], "<tool_response>\nsunny"),
    "hermes-macros": (HERMES_MACROS, CHAT[1:2], [TOOL], "get_weather(city: str)"),
    "mistral-tools": (MISTRAL_TOOLS, ANSWERED, [TOOL], '[TOOL_CALLS] [{"name": "get_weather"'),
    "qwen3-thinking": (QWEN3_THINKING, CHAT, None, "<think>\n\n</think>"),
    "gemma-generation": (GEMMA_GENERATION, CHAT[1:], None, "<start_of_turn>model\n<think>"),
}


def scan_template(tmp_path: Path, text: str, name: str = "chat_template.jinja") -> Any:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return modelport.scan(path)


def findings_of(report: Any) -> list[tuple[str, str]]:
    return [(f.rule, f.severity.value) for file in report.files for f in file.findings]


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_chat_templates_render_in_transformers_and_scan_safe(
    tmp_path: Path, name: str
) -> None:
    """transformers' own renderer is the oracle that these are working templates."""
    from transformers.utils.chat_template_utils import render_jinja_template

    template, chat, tools, expected = REAL[name]
    (rendered,), _ = render_jinja_template(
        conversations=[chat],
        tools=tools,
        chat_template=template,
        add_generation_prompt=True,
        return_assistant_tokens_mask=name == "gemma-generation",
        enable_thinking=False,
        bos_token="<s>",
        eos_token="</s>",
    )
    assert expected in rendered
    report = scan_template(tmp_path, template)
    assert report.verdict == "safe"
    assert findings_of(report) == []


def test_real_templates_in_every_place_loaders_read_them(tmp_path: Path) -> None:
    """tokenizer_config.json (a string, a list of named templates, a {name: template} dict),
    chat_template.json (processors), additional_chat_templates/*.jinja, and GGUF metadata
    (tokenizer.chat_template and tokenizer.chat_template.<name>)."""
    import gguf

    named = [{"name": re.sub(r"\W", "_", name), "template": REAL[name][0]} for name in sorted(REAL)]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": LLAMA3}))
    (tmp_path / "processor_config.json").write_text(
        json.dumps({"chat_template": {n["name"]: n["template"] for n in named}})
    )
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text(QWEN25_TOOLS)
    writer = gguf.GGUFWriter(tmp_path / "model.gguf", "llama")
    writer.add_chat_template(named)
    writer.add_tensor("w", np.ones(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    report = modelport.scan(tmp_path)
    assert report.verdict == "safe"
    assert findings_of(report) == []
    escape = "{{ cycler.__init__.__globals__.os.popen('id').read() }}"
    named[3]["template"] = escape
    writer = gguf.GGUFWriter(tmp_path / "model.gguf", "llama")
    writer.add_chat_template(named)
    writer.add_tensor("w", np.ones(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tmp_path / "processor_config.json").write_text(
        json.dumps({"chat_template": {n["name"]: n["template"] for n in named}})
    )
    report = modelport.scan(tmp_path)
    flagged = sorted(
        (Path(file.path).name, f.rule, f.member) for file in report.files for f in file.findings
    )
    name = named[3]["name"]
    assert report.verdict == "unsafe"
    assert flagged == [
        ("model.gguf", "template-injection", f"tokenizer.chat_template.{name}"),
        ("processor_config.json", "template-injection", f"chat_template.{name}"),
    ]


@dataclass(frozen=True)
class Attack:
    """An attack template, what it is judged, its benign twin, and (for escapes) what a plain
    ``jinja2.Environment`` prints when it renders it."""

    name: str
    template: str
    rule: str
    twin: str
    plain: str | None = None  # what the plain render shows; the sandbox must not show it
    content: str = "__class__"  # messages[0]['content'] when rendered


MESSAGES_ROLE = "{% set m = {'role': 'user'} %}"
ATTACKS = [
    Attack(
        "dotted",
        "{{ cycler.__init__.__globals__.os.__name__ }}",
        "template-injection",
        "{% set c = cycler('a', 'b') %}{{ c.next() }}{{ c.next() }}",
        "os",
    ),
    Attack(
        "concat",
        "{{ ''['__cla' ~ 'ss__'] }}",
        "template-injection",
        MESSAGES_ROLE + "{{ m['ro' ~ 'le'] }}",
        "<class 'str'>",
    ),
    Attack(
        "plus",
        "{{ ''['__cla' + 'ss__'] }}",
        "template-injection",
        MESSAGES_ROLE + "{{ m['ro' + 'le'] }}",
        "<class 'str'>",
    ),
    Attack(
        "escapes-attr",
        r"{{ ()|attr('\x5f\x5fclass\x5f\x5f') }}",
        "template-injection",
        r"{{ namespace(role='user')|attr('\x72ole') }}",
        "<class 'tuple'>",
    ),
    Attack(
        "join",
        "{{ ''[['__cla', 'ss__']|join] }}",
        "template-injection",
        MESSAGES_ROLE + "{{ m[['ro', 'le']|join] }}",
        "<class 'str'>",
    ),
    Attack(
        "lower",
        "{{ ''['__CLASS__'|lower] }}",
        "template-injection",
        MESSAGES_ROLE + "{{ m['ROLE'|lower] }}",
        "<class 'str'>",
    ),
    Attack(
        "reverse",
        "{{ ''['__ssalc__'|reverse] }}",
        "template-injection",
        MESSAGES_ROLE + "{{ m['elor'|reverse] }}",
        "<class 'str'>",
    ),
    Attack(
        "slice",
        "{{ ''['__ssalc__'[::-1]] }}",
        "template-injection",
        MESSAGES_ROLE + "{{ m['elor'[::-1]] }}",
        "<class 'str'>",
    ),
    Attack(
        "percent-format",
        "{{ ''['%c%cclass%c%c'|format(95, 95, 95, 95)] }}",
        "template-injection",
        MESSAGES_ROLE + "{{ m['%s%s'|format('ro', 'le')] }}",
        "<class 'str'>",
    ),
    Attack(
        "replace",
        "{{ ''['XXclassXX'|replace('X', '_')] }}",
        "template-injection",
        MESSAGES_ROLE + "{{ m['roXX'|replace('XX', 'le')] }}",
        "<class 'str'>",
    ),
    Attack(
        "set-variable",
        "{% set k = '__cla' ~ 'ss__' %}{{ ''[k] }}",
        "template-injection",
        "{% set k = 'ro' ~ 'le' %}{{ messages[0][k] }}",
        "<class 'str'>",
    ),
    Attack(
        "set-block",
        "{% set k %}__class__{% endset %}{{ ''[k] }}",
        "template-injection",
        "{% set k %}role{% endset %}{{ messages[0][k] }}",
        "<class 'str'>",
    ),
    Attack(
        "loop-variable",
        "{% for k in ['__class__'] %}{{ ''[k] }}{% endfor %}",
        "template-injection",
        "{% for k in ['role', 'content'] %}{{ messages[0][k] }}{% endfor %}",
        "<class 'str'>",
    ),
    Attack(
        "macro-argument",
        "{% macro get(o, n) %}{{ o[n] }}{% endmacro %}{{ get('', '__class__') }}",
        "template-injection",
        "{% macro get(o, n) %}{{ o[n] }}{% endmacro %}{{ get(messages[0], 'role') }}",
        "<class 'str'>",
    ),
    Attack(
        "namespace-lipsum",
        "{% set ns = namespace(k='__glob' ~ 'als__') %}{{ lipsum[ns.k]['os'] }}",
        "template-injection",
        "{% set ns = namespace(k='ro' ~ 'le') %}{{ messages[0][ns.k] }}",
        "<module 'os'",
    ),
    Attack(
        "str-format-field",
        "{{ '{0.__class__}'.format('') }}",
        "template-injection",
        "{{ '{0} says {1}'.format(messages[0]['role'], messages[0]['content']) }}",
        "<class 'str'>",
    ),
    Attack(
        "map-attribute",
        "{{ ['']|map(attribute='__class__')|first }}",
        "template-injection",
        "{{ messages|map(attribute='role')|first }}",
        "<class 'str'>",
    ),
    Attack(
        "map-attr-filter",
        "{{ ['']|map('attr', '__class__')|first }}",
        "template-injection",
        "{{ [namespace(role='user')]|map('attr', 'role')|first }}",
        "<class 'str'>",
    ),
    Attack(
        "self-context",
        "{{ self._TemplateReference__context }}",
        "template-injection",
        "{% block greeting %}hi{% endblock %}{{ self.greeting() }}",
        "<Context",
    ),
    Attack(
        "computed-with-dunder-spelled",
        "{% set names = ['__class__'] %}{{ ''[messages[0]['content']] }}",
        "template-injection",
        MESSAGES_ROLE + "{{ m[messages[0]['content']] }}",
        "<class 'str'>",
    ),
    Attack(
        "computed-name-called",
        "{{ ''[messages[0]['content']]('pwned') }}",
        "template-suspicious-access",
        "{{ messages[0]['content'].strip() }}",
        "pwned",
    ),
    Attack(
        "attr-computed",
        "{{ ''|attr(messages[0]['content']) }}",
        "template-suspicious-access",
        "{{ messages|map(attribute='content')|join }}",
        "<class 'str'>",
    ),
    Attack(
        "format-computed",
        "{{ messages[0]['content'].format('') }}",
        "template-suspicious-access",
        "{{ '{}: {}'.format(messages[0]['role'], messages[0]['content']) }}",
        "<class 'str'>",
        content="{0.__class__}",
    ),
    Attack(
        "private-attribute",
        "{{ messages[0]._private }}",
        "template-suspicious-access",
        "{{ messages[0].content }}",
    ),
    Attack(
        "host-global",
        "{{ config.items() }}",
        "template-suspicious-access",
        "{% set config = {'a': 1} %}{{ config.items()|list }}",
    ),
    Attack(
        "include",
        "{% include 'secret.txt' %}",
        "template-include",
        "{% macro x() %}hi{% endmacro %}{{ x() }}",
    ),
    Attack(
        "import",
        "{% import 'secret.txt' as s %}",
        "template-include",
        "{% macro x() %}hi{% endmacro %}{{ x() }}",
    ),
    Attack(
        "from-import",
        "{% from 'secret.txt' import x %}",
        "template-include",
        "{% macro x() %}hi{% endmacro %}{{ x() }}",
    ),
    Attack(
        "extends",
        "{% extends 'secret.txt' %}",
        "template-include",
        "{% macro x() %}hi{% endmacro %}{{ x() }}",
    ),
    Attack(
        "huge-range",
        "{{ range(10 ** 9)|length }}",
        "template-resource",
        "{% for i in range(3) %}{{ i }}{% endfor %}",
        "1000000000",
    ),
    Attack(
        "huge-repeat",
        "{{ 'ab' * 10 ** 8 }}",
        "template-resource",
        "{{ '-' * 10 }}",
    ),
]
VERDICTS = {
    "template-injection": "unsafe",
    "template-suspicious-access": "suspicious",
    "template-include": "suspicious",
    "template-resource": "suspicious",
}


def context(attack: Attack) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": attack.content}]}


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.name)
def test_attack_is_caught_and_its_twin_is_safe(tmp_path: Path, attack: Attack) -> None:
    report = scan_template(tmp_path, attack.template)
    assert findings_of(report) == [
        (attack.rule, "high" if attack.rule == "template-injection" else "medium")
    ]
    assert report.verdict == VERDICTS[attack.rule]
    twin = scan_template(tmp_path, attack.twin, "twin.jinja")
    assert findings_of(twin) == []
    assert twin.verdict == "safe"
    sandbox = ImmutableSandboxedEnvironment(extensions=[loopcontrols])
    sandbox.from_string(attack.twin).render(**context(attack))  # a working template


@pytest.mark.parametrize("attack", [a for a in ATTACKS if a.plain], ids=lambda a: a.name)
def test_plain_jinja_reaches_what_the_sandbox_blocks(attack: Attack) -> None:
    """What makes these attacks: a renderer without the sandbox (llama.cpp-style engines
    re-implement Jinja; older servers call jinja2.Environment) prints Python internals."""
    assert attack.plain is not None
    plain = jinja2.Environment().from_string(attack.template).render(**context(attack))
    assert attack.plain in plain
    try:
        sandboxed = ImmutableSandboxedEnvironment().from_string(attack.template)
        shown = sandboxed.render(**context(attack))
    except (SecurityError, OverflowError):
        return
    assert attack.plain not in shown


def test_include_reads_files_through_a_loader(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("API_KEY=hunter2")
    loader = jinja2.FileSystemLoader(tmp_path)
    rendered = jinja2.Environment(loader=loader).from_string("{% include 'secret.txt' %}")
    assert rendered.render() == "API_KEY=hunter2"


def test_escape_message_names_the_chain_and_its_entry_point(tmp_path: Path) -> None:
    report = scan_template(
        tmp_path, "hello\n{{ cycler.__init__.__globals__.os.popen('id').read() }}"
    )
    (finding,) = report.files[0].findings
    assert finding.member == "chat_template.jinja"
    assert finding.message.startswith(
        "chat template: `cycler.__init__.__globals__.os.popen('id').read()` (line 2) reaches "
        "'__init__', '__globals__' from the Jinja global 'cycler' and calls what it finds: "
    )


@pytest.mark.parametrize(
    "text",
    [
        "{{ 'see __init__.py' }}",
        "Write a __class__ and an __init__ method for {{ messages[0]['content'] }}.",
        "{# cycler.__init__.__globals__ #}{{ messages[0]['role'] }}",
        "{% raw %}{{ x.__class__ }}{% endraw %}",
        "{{ '__class__' }}",
        "{{ messages[0]['content'].replace('__globals__', '') }}",
    ],
)
def test_templates_that_only_mention_dunders_are_safe(tmp_path: Path, text: str) -> None:
    report = scan_template(tmp_path, text)
    assert findings_of(report) == []
    assert report.verdict == "safe"


@pytest.mark.parametrize(
    "text",
    [
        "{% for m in messages %}{{ messages[loop.index0 - 1]['content'].removeprefix('> ') }}"
        "{% endfor %}",
        "{% set ns = namespace(i=0) %}{% for m in messages %}{% set ns.i = loop.index0 %}"
        "{% endfor %}{{ messages[ns.i]['content'].removesuffix('.') }}",
        "{% for i in range(messages|length) %}{{ messages[i]['content'].removesuffix('.') }}"
        "{% endfor %}",
        "{% set last = messages|length - 1 %}{{ messages[last]['content'].removesuffix('.') }}",
    ],
)
def test_lookups_by_computed_numbers_are_safe(tmp_path: Path, text: str) -> None:
    """List indexes never fall back to attribute lookup, so calling a method on what they
    find is ordinary template code, even a method outside the usual string ones."""
    report = scan_template(tmp_path, text)
    assert findings_of(report) == []
    rendered = ImmutableSandboxedEnvironment().from_string(text).render(messages=CHAT)
    assert "Be brief" in rendered or "Thanks" in rendered


def test_a_template_jinja_cannot_parse_is_an_error(tmp_path: Path) -> None:
    report = scan_template(tmp_path, "{% for m in messages %}{{ m.content }}")
    assert report.verdict == "error"
    assert findings_of(report) == [("not-analysed", "high")]
    assert "line 1" in report.files[0].findings[0].message
    closed = scan_template(tmp_path, "{% for m in messages %}{{ m.content }}{% endfor %}")
    assert closed.verdict == "safe"


def test_without_jinja2_templates_are_not_analysed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    templates._environment.cache_clear()
    monkeypatch.setitem(sys.modules, "jinja2", None)
    try:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
        report = modelport.scan(tmp_path / "tokenizer_config.json")
        with pytest.raises(modelport.errors.MissingDependencyError, match="jinja2"):
            templates.judge("t", CHATML)
    finally:
        templates._environment.cache_clear()
    assert report.verdict == "error"
    (finding,) = report.files[0].findings
    assert (finding.rule, finding.member) == ("not-analysed", "chat_template")
    assert "pip install" in finding.message

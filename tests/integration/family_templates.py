"""Chat templates in the layout of Llama 3.1, Mistral (v3 tokenizer) and Phi-4-mini, with tools.

Shortened from the models' own templates: the same markers and message layout, so that the
tool-call format is detected from the template and prompts look like the real ones. The tiny
test tokenizer has none of these markers as special tokens: they are plain text to it.
"""

from __future__ import annotations

LLAMA3 = """{{- bos_token }}
{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}\
{%- else %}{%- set system = '' %}{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{%- if tools %}{{- 'Environment: ipython\\n' }}{%- endif %}
{{- 'Cutting Knowledge Date: December 2023\\n\\n' + system + '<|eot_id|>' }}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- elif message.role == 'user' and tools and loop.last %}
{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' }}
{{- 'Given the following functions, please respond with a JSON for a function call with its '
    'proper arguments that best answers the given prompt.\\n\\nRespond in the format '
    '{"name": function name, "parameters": dictionary of argument name and its value}.'
    'Do not use variables.\\n\\n' }}
{%- for tool in tools %}{{- tool | tojson(indent=4) + '\\n\\n' }}{%- endfor %}
{{- message.content + '<|eot_id|>' }}
{%- elif message.role == 'assistant' and message.tool_calls %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- for call in message.tool_calls %}
{{- '{"name": "' + call.function.name + '", "parameters": ' }}
{{- call.function.arguments | tojson + '}' }}{%- if not loop.last %}{{- '; ' }}{%- endif %}
{%- endfor %}
{{- '<|eot_id|>' }}
{%- elif message.role == 'tool' %}
{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}
{%- else %}
{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' }}
{{- message.content + '<|eot_id|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}\
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""

MISTRAL = """{{- bos_token }}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- elif message.role == 'user' %}
{%- if tools and loop.last %}{{- '[AVAILABLE_TOOLS] ' + tools | tojson + '[/AVAILABLE_TOOLS]' }}\
{%- endif %}
{{- '[INST] ' }}
{%- if loop.last and messages[0].role == 'system' %}\
{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- message.content + '[/INST]' }}
{%- elif message.role == 'assistant' and message.tool_calls %}
{{- '[TOOL_CALLS] [' }}
{%- for call in message.tool_calls %}
{{- '{"name": "' + call.function.name + '", "arguments": ' }}
{{- call.function.arguments | tojson + '}' }}{%- if not loop.last %}{{- ', ' }}{%- endif %}
{%- endfor %}
{{- ']' + eos_token }}
{%- elif message.role == 'assistant' %}{{- message.content + eos_token }}
{%- elif message.role == 'tool' %}
{{- '[TOOL_RESULTS] {"content": ' + message.content | tojson + '}[/TOOL_RESULTS]' }}
{%- endif %}
{%- endfor %}
"""

PHI4 = """{%- if tools or messages[0].role == 'system' %}
{{- '<|system|>' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content }}\
{%- else %}{{- 'You are a helpful assistant with some tools.' }}{%- endif %}
{%- if tools %}{{- '<|tool|>' + tools | tojson + '<|/tool|>' }}{%- endif %}
{{- '<|end|>' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- elif message.role == 'assistant' and message.tool_calls %}
{{- '<|assistant|><|tool_call|>' + message.tool_calls | map(attribute='function') | list \
| tojson + '<|/tool_call|><|end|>' }}
{%- elif message.role == 'tool' %}
{{- '<|tool_response|>' + message.content + '<|end|>' }}
{%- else %}
{{- '<|' + message.role + '|>' + message.content + '<|end|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}
"""

TEMPLATES = {"llama3": LLAMA3, "mistral": MISTRAL, "phi4": PHI4}

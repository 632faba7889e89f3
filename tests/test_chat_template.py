"""The chat template from the GGUF file, rendered in a sandbox."""

from __future__ import annotations

import pytest

from lfm_edge.chat_template import ChatTemplate, TemplateError
from lfm_edge.errors import LfmEdgeError
from lfm_edge.gguf_file import GGUFFile

TOOLS = [
    {
        "name": "get_candidate_status",
        "description": "Retrieves the current status of a candidate in the recruitment process",
        "parameters": {
            "type": "object",
            "properties": {"candidate_id": {"type": "string", "description": "Unique identifier for the candidate"}},
            "required": ["candidate_id"],
        },
    }
]
CONVERSATION = [
    {"role": "user", "content": "What is the current status of candidate ID 12345?"},
    {
        "role": "assistant",
        "content": '<|tool_call_start|>[get_candidate_status(candidate_id="12345")]<|tool_call_end|>'
        "Checking the current status of candidate ID 12345.",
    },
    {"role": "tool", "content": '[{"candidate_id": "12345", "status": "Interview Scheduled"}]'},
]

# The format the LFM2 model card shows for this conversation (../shared/seeds).
EXPECTED = (
    "<|startoftext|><|im_start|>system\n"
    'List of tools: <|tool_list_start|>[{"name": "get_candidate_status", "description": "Retrieves the current '
    'status of a candidate in the recruitment process", "parameters": {"type": "object", "properties": '
    '{"candidate_id": {"type": "string", "description": "Unique identifier for the candidate"}}, "required": '
    '["candidate_id"]}}]<|tool_list_end|><|im_end|>\n'
    "<|im_start|>user\nWhat is the current status of candidate ID 12345?<|im_end|>\n"
    '<|im_start|>assistant\n<|tool_call_start|>[get_candidate_status(candidate_id="12345")]<|tool_call_end|>'
    "Checking the current status of candidate ID 12345.<|im_end|>\n"
    "<|im_start|>tool\n<|tool_response_start|>"
    '[{"candidate_id": "12345", "status": "Interview Scheduled"}]<|tool_response_end|><|im_end|>\n'
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def template(gguf_path) -> ChatTemplate:
    f = GGUFFile(gguf_path("moe", "q8_0"))
    return ChatTemplate(f.metadata["tokenizer.chat_template"], bos_token="<|startoftext|>", eos_token="<|im_end|>")


def test_renders_the_model_card_format_with_tools(template):
    assert template.render(CONVERSATION, tools=TOOLS) == EXPECTED


def test_system_prompt_and_no_generation_prompt(template):
    text = template.render(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], add_generation_prompt=False
    )
    assert text == "<|startoftext|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_matches_transformers_apply_chat_template(template, checkpoint):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(checkpoint("moe")))
    for messages, tools in ((CONVERSATION, TOOLS), (CONVERSATION[:1], None)):
        theirs = tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        assert template.render(messages, tools=tools) == theirs


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os.popen('echo pwned').read() }}",
        "{% set x = messages.append({'role': 'user'}) %}{{ x }}",
    ],
)
def test_malicious_templates_cannot_escape_the_sandbox(source):
    t = ChatTemplate(source)
    with pytest.raises(TemplateError):
        t.render([{"role": "user", "content": "hi"}])


def test_template_errors_are_one_sentence():
    with pytest.raises(TemplateError, match="does not parse"):
        ChatTemplate("{% for %}")
    t = ChatTemplate("{{ raise_exception('only user and assistant roles') }}")
    with pytest.raises(TemplateError, match="only user and assistant roles"):
        t.render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    "messages",
    [
        "hello",
        [{"content": "no role"}],
        [{"role": "robot", "content": "x"}],
        [{"role": "user", "content": 42}],
    ],
)
def test_bad_messages_are_rejected(template, messages):
    with pytest.raises(LfmEdgeError):
        template.render(messages)

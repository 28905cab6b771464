"""An emulator of Ollama's OpenAI-compatible API (``/v1/...``), faithful to its wire format.

It stands in for Ollama in proxyd's tests (in-process or as a subprocess), in demo mode
(``python app.py --demo``) and in the load benchmarks. It is a package of its own, apart from proxyd,
and imports nothing from it: it is the test double the proxy is checked against, so its model-name
rules, its tokenizer and its prompt templates are its own (tests/test_boundaries.py keeps it so).

What it answers follows Ollama's own source (ollama/ollama at fb30760, v0.33.0-rc2: openai/openai.go,
middleware/openai.go, server/routes.go): the non-stream bodies, both chat stream formats ("old" =
v0.5.2..v0.32.5, "new" = v0.32.6+), the /v1/completions usage quirk, image handling, the error
catalogue, models, embeddings and the Host check.

- wire.py       JSON as Go writes and reads it, the error envelope, answer and chunk shapes
- jobs.py       a request body → what to generate, or Ollama's 400
- names.py      Ollama's model-name rules (ParseRef, ParseName, IsValid, EqualFold matching)
- templates.py  the prompt Ollama renders for a request (FromChatRequest, collate, the templates)
- tokenizer.py  Llama 3 ranks and the prompt's token count (usage.prompt_tokens)
- replies.py    deterministic replies and embeddings
- faults.py     injected faults and the [[emu:...]] directives
- handlers.py   the Tornado handlers; server.py the app and start_emulator; state.py its options
- native.py     Ollama's native API (/api/chat, /api/generate, /api/embed, ...): NDJSON, {"error"}

Run alone: ``python -m ollama_emulator --port 11434 --token-delay 0.02``.
"""

from .faults import FAULTS, Fault, parse_fault
from .server import make_app, start_emulator
from .state import EmulatorOptions, EmulatorState

__all__ = ["FAULTS", "EmulatorOptions", "EmulatorState", "Fault", "make_app", "parse_fault", "start_emulator"]

"""An artifact behind OpenAI's chat-completions API (``prumerge-export serve``): device side, no torch."""

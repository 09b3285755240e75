"""OpenAI-compatible serving: protocol (pydantic shapes) → routes (HTTP) → service (engine thread) → app."""

"""``local``: Tether's built-in offline model, for demos and tests (not a language model).

The model and its rules are in ``model``; the pure computation it relies on is in two modules
of its own: ``extractive`` picks the sentences of the web sources that answer a question, and
``tool_arguments`` picks an offered function and fills its arguments from the message. Only
the model itself and its id are public; the router is the one user above this package.
"""

from server.providers.llm.local.model import MODEL_ID, LocalModel

__all__ = ["MODEL_ID", "LocalModel"]

"""``mcore serve``: an OpenAI-compatible HTTP server over the inference engine.

Why it exists: clients written for the OpenAI API (the ``openai`` package, LangChain, curl scripts) talk to an mcore
model without change. The pieces, one job each:

* ``engine_loop``: one background thread owns the ``LLMEngine``; requests come in through a thread-safe queue, outputs
  go out to one asyncio queue per HTTP request (no FastAPI here);
* ``protocol``: the request bodies (pydantic) and their translation to ``SamplingParams``;
* ``errors``: OpenAI error objects;
* ``chat_template``: messages to a prompt;
* ``app``: ``build_app`` (the FastAPI routes, streaming by server-sent events);
* ``cli``: ``mcore serve PATH``.

FastAPI and uvicorn are the optional extra ``serve`` (``pip install mcore-inference[serve]``); importing
``mcore_inference`` or this package does not import them.
"""

"""``mcore serve``: an OpenAI-compatible HTTP server over the inference engine.

Why it exists: clients written for the OpenAI API (the ``openai`` package, LangChain, curl scripts) talk to an mcore
model without change. The pieces, one job each:

* ``engine_core``: the engine in plain data (the caller's request ids, output deltas, admission with
  ``max_waiting``, stop reasons, stats), driven by one thread, wherever the engine runs;
* ``engine_process``: the engine in a process of its own (the default of ``mcore serve``), JSON over a pipe;
* ``engine_loop``: the engine in a background thread of the server process instead;
* ``client``: the ``EngineClient`` interface both implement, and the table of per-request output queues;
* ``metrics``: counters and latency histograms, and ``/metrics`` in Prometheus text;
* ``protocol``: the request bodies (pydantic) and their translation to ``SamplingParams``;
* ``errors``: OpenAI error objects;
* ``chat_template``: messages to a prompt;
* ``app``: ``build_app`` (the FastAPI routes, streaming by server-sent events);
* ``cli``: ``mcore serve PATH``.

FastAPI and uvicorn are the optional extra ``serve`` (``pip install mcore-inference[serve]``); importing
``mcore_inference`` or this package does not import them.
"""

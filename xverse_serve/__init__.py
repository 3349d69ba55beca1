"""xverse-serve: XVERSE-7B-Chat behind the seed's API and an OpenAI-compatible one.

The folders are the architecture, and imports run one way, each layer using only those below it:

    settings, launch   the flags, and start-up (api.py calls these)
    server/            HTTP: routes, request bodies, errors, metrics, lifecycle, the chat page
    engine/            the client the server talks to, its transports, the step loop, scheduler, runner, graphs
    model/             checkpoint, the XVERSE decoder and its reference attention, quantization, tokenizer, chat format
    kernels/           the Triton kernels

docs/architecture.md follows a request through them.
"""

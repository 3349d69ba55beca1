"""The engine: the client the server talks to (client.EngineClient) and its two transports, the step loop
(engine.Engine), the scheduler, the model runner with its CUDA graphs, the memory plan and the sampler."""

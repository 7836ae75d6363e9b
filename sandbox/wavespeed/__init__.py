"""A local stand-in for WaveSpeed's `kwaivgi/kling-v2.1-i2v-pro` API.

It answers the endpoints of `reference/WAVESPEED.md` in WaveSpeed's envelope, renders real
H.264 clips that move a camera over the input image, signs and retries webhooks, keeps a charge
ledger and acts out a configurable fault profile. Run it with `python -m sandbox.wavespeed`, or
in-process with `sandbox.wavespeed.app.create_app(SimulatorConfig(...))`; the admin endpoints
live under `/_sim/`.

Modules: `config` (settings), `faults` (fault profile), `validation` (model input rules),
`render` (the video engine), `store` (in-memory state), `tasks` (a prediction's lifecycle),
`webhooks` (signing and delivery), `api` / `cdn` / `admin` (routes), `server` (uvicorn),
`testing` (helpers for tests that drive the simulator).
"""

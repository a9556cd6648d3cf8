"""The edge-cloud learning loop (issue #13): uncertainty sampling on the device into a durable spool, upload over
NATS JetStream to a cloud collector that stores, counts and exports samples for labelling, a frame-result cache
for video streams, and the way back to the fleet (a better retrained version starts a canary rollout).

    uncertainty   per-detection class probabilities, entropy and margin; the keep rule (pure numpy)
    spool         the device's durable on-disk spool: bounded in bytes, rate limited, survives restarts
    sampler       the Triton side path: decides per image and hands samples to the spool on a thread
    pipeline_step adds the sampler step to a rendered repository (the spec's `sampling` section)
    uploader      device -> cloud over JetStream when reachable; a sample leaves the spool once stored
    collector     cloud side: content-addressed object store, counts, COCO export
    frame_cache   per-stream reuse of detections for near-identical video frames
    promote       a registered version better than the deployed one by a margin -> canary rollout (or proposal)

uncertainty, spool, sampler and errors import only backends/ and the standard library: pipeline_step copies
them into the rendered repository beside backends/.
"""

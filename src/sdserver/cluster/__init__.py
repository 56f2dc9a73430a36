"""Scale-out on Ray Serve (`sdserver serve --ray`, `pip install 'sdserver[ray]'`).

The same HTTP API, served by a Ray Serve application of three parts:

- the ingress (ingress.py): the FastAPI app of a single server (every protocol, the studio, the docs),
  built by `create_app` with a backend that sends generation to the engine replicas;
- engine replicas (replica.py): each owns one device, its Engine and its own Scheduler (step-level
  batching); requests reach a replica that has their model loaded (Ray Serve model multiplexing);
- the job board (board.py): one Ray actor that holds every job's state and the history, so any
  ingress reads, streams and cancels any job, and each image is saved once.

Only these modules import Ray; the single-process server never imports this package.
"""

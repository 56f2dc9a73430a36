"""Protocol-independent serving: jobs, the bounded queue, the batcher and the worker that owns the device."""

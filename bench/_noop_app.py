"""A Dramatiq actor that does nothing, on the same broker the service uses: the engine's own ceiling.

    dramatiq _noop_app --path bench --queues bench-noop --processes P --threads T

The broker is ``worker.broker.make_broker(Settings())``: a RedisBroker on REDIS_URL and
REMIND_REDIS_NAMESPACE with the same middleware (the service's Retries) as ``remind worker``. The actor's
body is empty; the benchmark counts a message as done when the broker acknowledges it (its entry leaves
the queue's ``.msgs`` hash in Redis), which happens after the actor returns.
"""

import dramatiq

from worker.broker import make_broker
from worker.settings import Settings

QUEUE = "bench-noop"

broker = make_broker(Settings(_env_file=None))
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name="bench.noop", queue_name=QUEUE, broker=broker)
def noop(i: int) -> None:
    pass

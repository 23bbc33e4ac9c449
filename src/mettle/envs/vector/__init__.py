"""Run any TrainingEnvironment in worker processes, with every batch in shared memory.

`VectorEnvironment(make_env, num_envs, num_workers)` starts `num_workers` processes; worker `w` calls
`make_env(num_envs // num_workers, w)` once and owns the contiguous agent rows of its instances.

Data path. The parent allocates one shared-memory segment holding observations, rewards, terminals,
truncations, mask and starts for all rows, plus a `[rows, heads]` action array (int64; float32 for a
Box). A step is: the parent copies the actions into the segment and sends each worker of the group a
one-byte message; the worker calls `send_actions` on its sub-env with a view of its action rows, copies the
sub-env's next batch into its block (one memcpy per field) and answers one byte, or the pickled
infos when episodes ended (infos carry global `env_id`s). Observations are never pickled.

Signalling. One duplex `Pipe` per worker with tiny byte messages: a pipe gives low latency
(a write and a poll per worker per step), ordering, and end-of-file when a worker dies. The parent
first polls the group's pipes without blocking and only then blocks in `connection.wait` on the
pipes and the process sentinels, so a dead worker is noticed at once and a hung one after
`timeout_s`; either raises `EnvironmentWorkerError` naming the worker, its pid and exit status
(`died` tells a worker that ended, e.g. killed by SIGKILL, from one that raised or hung).

Double buffering. With `async_factor = k` the workers form k groups, each a contiguous slice of
rows. `get_observations` returns the group whose actions were sent longest ago (waiting for it if
needed); a group that was received but not yet sent actions is never waited on. Groups therefore
come back in a fixed round-robin order, the same in every mode and run, so multiprocess results
equal serial results exactly. `send_actions` applies to the oldest received group still waiting
for actions (normally the only one: the last batch received); pass `rows=` to name it explicitly.

Start method. "fork" on Linux when the parent runs a single Python thread (fast: nothing is
imported or pickled again); otherwise "forkserver" where available, else "spawn". Pass
`start_method=` to force one. `make_env` must be picklable (a top-level function or a
functools.partial of one) so every start method works; this is checked up front. On Linux a worker
names itself `mettle-env-<index>` (its comm, as ps, top and pgrep show it), matching the errors.

Cleanup. Workers are ended on `close()`, context exit, garbage collection and interpreter exit
(a `multiprocessing.util.Finalize` with an exit priority, which runs before multiprocessing joins
its children). Workers ignore SIGINT and SIGTERM (the parent decides: a graceful stop's checkpoint
needs them, and torchrun signals a rank's whole process group) and exit by themselves when the parent
dies: while idle they poll their pipe every 0.5 s and leave when their parent pid changes. That is
portable and, unlike prctl(PR_SET_PDEATHSIG), does not fire when merely the thread that started
them exits. After a failure close() sends the close message but does not wait for answers: it sends
SIGCONT (so a stopped worker acts) and SIGKILL to whoever is left after a grace period. The shared-memory
segment is unlinked on close (and by multiprocessing's resource tracker if the parent is killed).
A process forked from the parent after the workers started (the actor of overlapped training) may step
the env: it sees a worker's death through the same pipe and sentinel, reported as "exited" without an exit
code (only the parent can reap the worker), and its close() only drops its own copies, never ends workers.

Seeding. `reset(seed)` resets worker w's sub-env with `seed + w * (num_envs // num_workers)`, the
global index of its first instance. A sub-env that seeds its instance i with `seed + i` (like
`GymnasiumEnvironment`) therefore gives the same rollouts for any `num_workers`. The first reset
without a seed uses the constructor's `seed`; later resets without one pass None through.

`mode="serial"` runs the same sub-envs in-process (for debugging) with the same rows, groups, order
and copies; a group is stepped when its actions are sent, and a sub-env error is raised as
`EnvironmentWorkerError` (chained to the original) from the next `get_observations`.

Modules: `layout` (the shared arrays and the message tags), `worker` (the worker process's loop and the
runner that copies a sub-env's batch into its rows), `backends` (worker processes, or serial in-process),
`environment` (`VectorEnvironment` itself and the checks on its layout).
"""

from mettle.envs.vector.backends import EnvironmentWorkerError
from mettle.envs.vector.environment import VectorEnvironment, VectorizedTrainingEnvironment
from mettle.envs.vector.layout import EnvFactory

__all__ = ["EnvFactory", "EnvironmentWorkerError", "VectorEnvironment", "VectorizedTrainingEnvironment"]

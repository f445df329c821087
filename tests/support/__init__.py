"""What the tests share, one module per concern (a test module imports the ones it needs):

waiting    wait_for / wait_for_async: poll a condition with a deadline, never sleep blindly
services   the session's servers (fixtures), private servers a test may kill, unique names
tasks      running(): a task of a catalog in the test's event loop, supervised as in production
workers    Worker, task_worker(): the one launcher of processes (a task as its own worker, any
           command), their logs, SIGTERM / kill -9 / SIGSTOP by PID; also the worker script
cli        `localflow` commands as a user runs them (localflow(), worker(), command())
api        the control-plane tests: `localflow run --api-port 0`, a source API
files      the `files` capture tests: a catalog over a temp log directory, a log writer
sources    sources a pipeline plays against: Sophia's API and /metrics, agent logs, a fault proxy
pipeline   the Sophia pipeline: its catalog, names, and one process per task
census     what every stage holds (topics, rows, keys, objects), counted from the servers
judge      a census against what the sources produced: lost, doubled, dead letters
faults     the fault trials: the pipeline on private servers, a trial, the table of trials
"""

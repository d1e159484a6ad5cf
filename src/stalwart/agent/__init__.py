"""stalwart.agent: one node's agent, built on torch.distributed.elastic.

=========== ==================================================================
agent       ``StalwartAgent``: the elastic hooks and the observe/decide/execute loop
api         ``AgentConfig`` (resolved by the launcher) and ``ScriptFailed``
policy      ``AgentState``, the restart ladder as data, pure ``decide``, exit codes
jobstore    job-wide generation, restart budget and per-generation workers' store
procs       starting/stopping worker processes, carrying their output
workerenv   each worker's environment; pre/post-train scripts
failures    worker failures as data (root cause, traceback, signature)
timeline    JSONL events per node and the per-incident summary (``stalwart events``)
status      ``/status`` and ``/metrics``
standby     warm standby workers
=========== ==================================================================
"""

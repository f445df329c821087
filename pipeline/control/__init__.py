"""The control plane: tasks created, paused and removed at run time, shared by every worker.

* ``store``: the config topic (compacted, one partition), where the API writes its changes and
  from which every worker reads them, as Kafka Connect does with its config topic;
* ``effective``: the catalog file plus those changes, validated by ``load_catalog`` itself;
* ``runner``: the set of supervised tasks of one worker, reconciled with that catalog;
* ``api``: the REST API of ``localflow run --api-port``.
"""

"""``liveclone daemon``: one long-running process that owns many clones.

Parts, each in its own module:

- ``paths``: the default state directory, API socket and NBD socket (root and not);
- ``records``: the state directory, one crash-safe record per clone, from which a
  restarted daemon serves every clone again under the same name;
- ``manager``: the clones themselves (add, remove, pause, resume, status), each a
  ``CloneSession`` exported on the one NBD server and shown in the FUSE directory;
- ``api``: the REST API on a unix socket (aiohttp), its OpenAPI document
  (``openapi``), server-sent events (``events``) and Prometheus ``/metrics``
  (``metrics``);
- ``service``: the process: logging, listeners, signals, start and stop;
- ``client``: what the CLI's ``add``, ``ls``, ``rm``, ``status``, ``pause`` and
  ``resume`` use to talk to a daemon (the standard library only, for a fast start).
"""

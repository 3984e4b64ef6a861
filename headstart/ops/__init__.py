"""Operations, not pure logic: processes and locks around the pipeline (the servers `headstart
server` starts, the project lock every writer of artifacts takes). The library's core never
imports this package; the front door (cli.py) and the flows do."""

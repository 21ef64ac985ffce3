"""What the cluster's hosts run and how to read them: paths and rendered configuration, the command builders
(etcdctl, patronictl, psql) and the readers of their output, shared by sections, procedures and tasks."""

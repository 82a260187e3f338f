"""The loopback stand-in for embedtune's production cluster, one module per part:

    common         constants (ports, bucket, users) and small helpers (polling, 0600 files, spawning)
    state          state.json of a state dir, and its lock
    envs           environments: every server's, and what S3 / MLflow / Ray clients need
    s3             SeaweedFS (S3)
    postgres       PostgreSQL (MLflow's tracking and auth databases)
    mlflow_server  MLflow tracking server with basic auth
    ray_head       Ray head + autoscaler on the loopback fake multi-node provider
    processes      finding and stopping what was started
    faults         server crash + restart, a lost worker node
    cli            up / down / status / env / restart / kill-worker

The command line is `python cluster/local/cluster_local.py ...`, which also re-exports the public
names of these modules under their old module name (`import cluster_local`).
"""

"""Ray's fake multi-node provider, fixed for a loopback cluster whose nodes share one machine.

Used by cluster_local.py as an "external" node provider (`provider.type: external`,
`provider.module: cluster_local_fake_provider.LoopbackFakeMultiNodeProvider`; this directory is on
the head's PYTHONPATH so the autoscaler (monitor.py) can import it). It starts worker "nodes" as
extra raylets exactly like ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider
(Ray 2.60), with two differences:

1. Each worker node gets its own runtime-env directory (`runtime_resources_<node>` in the shared
   session dir). With the stock provider every node shares `runtime_resources/`, and the runtime
   env agent of each new node re-extracts a job's `working_dir` package over the same path
   (download_and_unpack_package(..., overwrite=True) removes it first), so the job driver and the
   trials already running in it lose their current directory: Tune trials die with
   `FileNotFoundError` from `os.getcwd()` as soon as a second worker node starts.
2. Worker raylets get `node_ip_address` from the provider config (127.0.0.1) instead of Ray's
   detection, which picks this machine's outward IP (and binds the node's servers there).
3. `provider.worker_env_remove`: variables dropped from this process's environment (the
   autoscaler's, a copy of the head's) before any worker node starts, so worker nodes and
   everything they run lack them: the driver's MLflow login stays on the head, as on the real
   clusters, where worker nodes never get the MLflow secret.
"""

from __future__ import annotations

import copy
import json
import os

import ray
import ray._private.ray_constants as ray_constants
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
from ray.autoscaler.tags import (
    NODE_KIND_WORKER,
    STATUS_UP_TO_DATE,
    TAG_RAY_NODE_KIND,
    TAG_RAY_NODE_NAME,
    TAG_RAY_NODE_STATUS,
    TAG_RAY_USER_NODE_TYPE,
)


class LoopbackFakeMultiNodeProvider(FakeMultiNodeProvider):
    def __init__(self, provider_config: dict, cluster_name: str) -> None:
        super().__init__(provider_config, cluster_name)
        self._node_ip = provider_config.get("node_ip_address", "127.0.0.1")
        if not self._gcs_address:
            raise ValueError("provider.gcs_address is required (e.g. 127.0.0.1:<GCS port>)")
        # This process (monitor.py) only starts worker nodes, which inherit its environment.
        for name in provider_config.get("worker_env_remove", []):
            os.environ.pop(name, None)

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        # As FakeMultiNodeProvider._create_node_with_resources_and_labels in Ray 2.60, plus
        # node_ip_address and a per-node runtime_env_dir_name.
        resources = copy.deepcopy(resources)
        with self.lock:
            node_type = tags[TAG_RAY_USER_NODE_TYPE]
            next_id = self._next_hex_node_id()
            ray_params = ray._private.parameter.RayParams(
                node_ip_address=self._node_ip,
                min_worker_port=0,
                max_worker_port=0,
                dashboard_port=None,
                dashboard_agent_listen_port=0,
                num_cpus=resources.pop("CPU", 0),
                num_gpus=resources.pop("GPU", 0),
                object_store_memory=resources.pop("object_store_memory", None),
                resources=resources,
                labels=labels,
                redis_address=self._gcs_address,
                gcs_address=self._gcs_address,
                runtime_env_dir_name=f"runtime_resources_{next_id[-5:]}",
                env_vars={
                    "RAY_OVERRIDE_NODE_ID_FOR_TESTING": next_id,
                    "RAY_CLOUD_INSTANCE_ID": next_id,
                    "RAY_NODE_TYPE_NAME": node_type,
                    ray_constants.RESOURCES_ENVIRONMENT_VARIABLE: json.dumps(resources),
                    ray_constants.LABELS_ENVIRONMENT_VARIABLE: json.dumps(labels),
                },
            )
            node = ray._private.node.Node(ray_params, head=False, shutdown_at_exit=False, spawn_reaper=False)
            all_tags = {
                TAG_RAY_NODE_KIND: NODE_KIND_WORKER,
                TAG_RAY_USER_NODE_TYPE: node_type,
                TAG_RAY_NODE_NAME: next_id,
                TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE,
            }
            all_tags.update(tags)
            self._nodes[next_id] = {"tags": all_tags, "node": node}

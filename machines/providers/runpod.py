"""RunPod adapter over its GraphQL API (https://api.runpod.io/graphql).

Queries and mutations follow runpod-python's GraphQL-era `runpod/api/` (inline input literals, the
same field names); recorded responses live in tests/machines/fixtures/runpod/.

RunPod sells GPU *types*, not hosts: an offer is (cloud, GPU type) and RunPod picks the machine at
create time. So `Offer.host_id` is the pool ("SECURE:NVIDIA GeForce RTX 4090") and the physical
host (`machineId`, our reliability key) appears on the instance once rented.
"""

from __future__ import annotations

import json
import logging
import re
import time
from decimal import Decimal, InvalidOperation
from typing import Any

import requests
import tenacity

from machines.providers.base import (
    STATUS_CREATING,
    STATUS_FAILED,
    STATUS_GONE,
    STATUS_RUNNING,
    STATUS_STOPPED,
    AuthError,
    CapacityError,
    FatalError,
    LaunchRequest,
    NotFoundError,
    Offer,
    OfferQuery,
    Provider,
    ProviderError,
    ProviderInstance,
    RetryableError,
    register_provider,
)

log = logging.getLogger(__name__)

RETRYABLE_STATUS = {429, 500, 502, 503, 504}
CLOUDS = ("SECURE", "COMMUNITY")
_POD_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
_CAPACITY_WORDS = ("no longer any instances available", "not enough free gpus", "no instances available")
_AUTH_WORDS = ("unauthorized", "unauthenticated", "forbidden", "api key")
_NOT_FOUND_WORDS = ("not found", "does not exist", "no pod")
_RATE_WORDS = ("rate limit", "too many requests")

_STATUS_MAP = {
    "CREATED": STATUS_CREATING,
    "RESTARTING": STATUS_CREATING,
    "RUNNING": STATUS_RUNNING,  # until `runtime` appears the container is still starting
    "EXITED": STATUS_STOPPED,  # what podStop leaves behind; /workspace survives
    "PAUSED": STATUS_STOPPED,
    "DEAD": STATUS_FAILED,
    "TERMINATED": STATUS_GONE,
}

POD_FIELDS = """
      id
      name
      desiredStatus
      lastStatusChange
      imageName
      gpuCount
      costPerHr
      machineId
      machine { podHostId gpuDisplayName }
      runtime {
        uptimeInSeconds
        ports { ip isIpPublic privatePort publicPort type }
        gpus { id gpuUtilPercent memoryUtilPercent }
      }
"""


class Enum(str):
    """A GraphQL enum value: rendered bare (SECURE), not quoted."""


def gql_literal(value: Any) -> str:
    """A Python value as a GraphQL input literal, as the SDK writes them inline.

    Strings go through json.dumps: its escapes (\\" \\\\ \\n \\uXXXX) are GraphQL's too, so no value can
    close the string and inject fields.
    """
    if isinstance(value, Enum):
        if not re.fullmatch(r"[A-Z_]+", value):
            raise ValueError(f"bad enum value {value!r}")
        return str(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(gql_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {gql_literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot render {type(value).__name__} as GraphQL")


def normalise_status(pod: dict[str, Any] | None) -> str:
    if not pod:
        return STATUS_GONE
    status = _STATUS_MAP.get(pod.get("desiredStatus") or "", STATUS_CREATING)
    if status == STATUS_RUNNING and not pod.get("runtime"):
        return STATUS_CREATING  # image still pulling / container not up yet
    return status


def _decimal(value: Any) -> Decimal | None:
    if value is None:
        return None
    try:
        return Decimal(str(value))
    except InvalidOperation:
        return None


def _contains(message: str, words: tuple[str, ...]) -> bool:
    lowered = message.lower()
    return any(w in lowered for w in words)


def parse_offer_id(offer_id: str) -> tuple[str, str]:
    cloud, sep, gpu_type_id = offer_id.partition(":")
    if not sep or cloud not in CLOUDS or not gpu_type_id:
        raise FatalError(f"not a RunPod offer id: {offer_id!r}", provider="runpod")
    return cloud, gpu_type_id


def _check_pod_id(pod_id: str) -> str:
    if not _POD_ID.match(pod_id):
        raise NotFoundError(f"not a RunPod pod id: {pod_id!r}", provider="runpod")
    return pod_id


@register_provider("runpod")
class RunPodProvider(Provider):
    def __init__(
        self,
        api_key: str,
        base_url: str = "https://api.runpod.io/graphql",
        *,
        timeout: float = 30.0,
        max_attempts: int = 4,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
        container_disk_gb: int = 20,
    ):
        if not api_key:
            raise AuthError("RunPod API key is empty", provider="runpod")
        self._secret = api_key
        self._base_url = base_url
        self._timeout = timeout
        self._max_attempts = max(1, max_attempts)
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._container_disk_gb = container_disk_gb
        self._session = requests.Session()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self._base_url!r})"

    # ---- transport ------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***")

    def _post_once(self, operation: str, query: str) -> dict[str, Any]:
        # The key travels in a header, never in the URL (the SDK's ?api_key= would end up in
        # requests' exception messages and in proxies' logs).
        headers = {"Authorization": f"Bearer {self._secret}", "Content-Type": "application/json"}
        try:
            response = self._session.post(
                self._base_url, data=json.dumps({"query": query}), headers=headers, timeout=self._timeout
            )
        except requests.RequestException as e:
            raise RetryableError(
                self._scrub(f"RunPod {operation}: {type(e).__name__}: {e}"), provider=self.name
            ) from None
        status = response.status_code
        try:
            body = response.json()
        except ValueError:
            body = None
        errors = body.get("errors") if isinstance(body, dict) else None
        if status in (401, 403):
            raise AuthError(
                f"RunPod {operation}: HTTP {status}: check the API key",
                status_code=status,
                provider=self.name,
            )
        if status in RETRYABLE_STATUS:
            raise RetryableError(f"RunPod {operation}: HTTP {status}", status_code=status, provider=self.name)
        if errors:
            raise self._graphql_error(operation, errors, status)
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("data"), dict):
            snippet = self._scrub(response.text[:200])
            raise FatalError(
                f"RunPod {operation}: HTTP {status}: {snippet!r}", status_code=status, provider=self.name
            )
        return body["data"]

    def _graphql_error(self, operation: str, errors: list[Any], status: int) -> ProviderError:
        messages = "; ".join(str(e.get("message", e)) if isinstance(e, dict) else str(e) for e in errors)
        codes = {str((e.get("extensions") or {}).get("code", "")) for e in errors if isinstance(e, dict)}
        message = self._scrub(f"RunPod {operation}: {messages}")
        if codes & {"UNAUTHENTICATED", "FORBIDDEN"} or _contains(messages, _AUTH_WORDS):
            return AuthError(message, status_code=status, provider=self.name)
        if _contains(messages, _CAPACITY_WORDS):
            return CapacityError(message, status_code=status, provider=self.name)
        if _contains(messages, _RATE_WORDS):
            return RetryableError(message, status_code=status, provider=self.name)
        if _contains(messages, _NOT_FOUND_WORDS):
            return NotFoundError(message, status_code=status, provider=self.name)
        return FatalError(message, status_code=status, provider=self.name)

    def _post(self, operation: str, query: str, *, retry: bool = True) -> dict[str, Any]:
        if not retry:
            return self._post_once(operation, query)
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(lambda e: isinstance(e, ProviderError) and e.retryable),
            stop=tenacity.stop_after_attempt(self._max_attempts),
            wait=tenacity.wait_exponential_jitter(
                multiplier=self._backoff_initial, max=self._backoff_max, jitter=self._backoff_initial
            ),
            before_sleep=lambda state: log.info(
                "RunPod %s failed (%s), retry %d", operation, state.outcome.exception(), state.attempt_number
            ),
            reraise=True,
        )
        return retrying(self._post_once, operation, query)

    # ---- offers ---------------------------------------------------------------------------

    def search_offers(self, query: OfferQuery) -> list[Offer]:
        gpu_count = query.num_gpus or 1
        lowest: dict[str, Any] = {"gpuCount": gpu_count}
        if query.region:
            lowest["countryCode"] = query.region
        data = self._post(
            "gpuTypes",
            f"""query GpuTypes {{
  gpuTypes {{
    id displayName memoryInGb maxGpuCount secureCloud communityCloud
    securePrice communityPrice secureSpotPrice communitySpotPrice
    lowestPrice(input: {gql_literal(lowest)}) {{ minimumBidPrice uninterruptablePrice stockStatus }}
  }}
}}""",
        )
        offers = [
            offer
            for gpu in data.get("gpuTypes") or []
            if self._gpu_matches(gpu, query, gpu_count)
            for offer in self._offers_for(gpu, query, gpu_count)
        ]
        offers = [
            o
            for o in offers
            if o.host_id not in query.exclude_host_ids
            and (query.max_price_per_hour is None or o.price_per_hour <= query.max_price_per_hour)
        ]
        offers.sort(key=lambda o: o.price_per_hour)
        return offers[: query.limit]

    @staticmethod
    def _gpu_matches(gpu: dict[str, Any], query: OfferQuery, gpu_count: int) -> bool:
        lowest = gpu.get("lowestPrice") or {}
        if lowest.get("stockStatus") is None:
            return False  # none in stock for this count / country
        if (gpu.get("maxGpuCount") or gpu_count) < gpu_count:
            return False
        if query.gpu_name:
            wanted = query.gpu_name.lower()
            gpu_id, name = str(gpu.get("id", "")).lower(), str(gpu.get("displayName", "")).lower()
            if wanted not in (gpu_id, name) and not gpu_id.endswith(" " + wanted):
                return False
        return True

    def _offers_for(self, gpu: dict[str, Any], query: OfferQuery, gpu_count: int) -> list[Offer]:
        offers = []
        for cloud in CLOUDS:
            prefix = cloud.lower()
            if not gpu.get(f"{prefix}Cloud"):
                continue
            per_gpu = _decimal(gpu.get(f"{prefix}SpotPrice" if query.interruptible else f"{prefix}Price"))
            if not per_gpu:
                continue  # 0 / null: not offered in this cloud
            offer_id = f"{cloud}:{gpu['id']}"
            offers.append(
                Offer(
                    provider=self.name,
                    offer_id=offer_id,
                    host_id=offer_id,
                    gpu_name=gpu.get("displayName") or gpu["id"],
                    num_gpus=gpu_count,
                    gpu_ram_gb=float(gpu.get("memoryInGb") or 0),
                    price_per_hour=per_gpu * gpu_count,
                    reliability=None,  # RunPod publishes no host score; our own history decides
                    region=query.region or "",
                    disk_gb=float(query.min_disk_gb or 0),  # chosen at create time
                    raw=gpu,
                )
            )
        return offers

    # ---- create ---------------------------------------------------------------------------

    def create(self, offer: Offer, launch: LaunchRequest) -> ProviderInstance:
        cloud, gpu_type_id = parse_offer_id(offer.offer_id)
        if launch.onstart:
            # RunPod's only boot hook (dockerArgs) replaces the image's start script, which is
            # what starts sshd and installs PUBLIC_KEY: run setup over SSH instead.
            raise FatalError("RunPod cannot run an onstart script; run it over SSH", provider=self.name)
        env = {**launch.env, "PUBLIC_KEY": "\n".join(launch.ssh_public_keys)}
        fields: dict[str, Any] = {
            "name": launch.label,
            "imageName": launch.image,
            "cloudType": Enum(cloud),
            "gpuTypeId": gpu_type_id,
            "gpuCount": offer.num_gpus,
            "supportPublicIp": True,  # direct SSH (and SFTP) needs a public IP, not RunPod's proxy
            "startSsh": True,
            "containerDiskInGb": self._container_disk_gb,
            "volumeInGb": launch.disk_gb,
            "volumeMountPath": "/workspace",  # survives a stop; the container disk does not
            "ports": "22/tcp",
            "env": [{"key": k, "value": v} for k, v in env.items()],
        }
        if offer.region:
            fields["countryCode"] = offer.region
        mutation = "podFindAndDeployOnDemand"
        if launch.interruptible:
            mutation = "podRentInterruptable"
            fields["bidPerGpu"] = offer.price_per_hour / max(offer.num_gpus, 1)
        query = f"mutation {{\n  {mutation}(input: {gql_literal(fields)}) {{\n{POD_FIELDS}  }}\n}}"
        try:
            # Never resent blindly: a create whose answer we lost may have rented a machine.
            data = self._post(mutation, query, retry=False)
        except RetryableError:
            found = self._find_by_label(launch.label)
            if found is not None:
                return found
            raise
        pod = data.get(mutation)
        if not pod or not pod.get("id"):
            raise FatalError(f"RunPod {mutation} returned no pod", provider=self.name)
        return self._instance(pod)

    def _find_by_label(self, label: str) -> ProviderInstance | None:
        try:
            matches = [i for i in self.list(label) if i.label == label and i.status != STATUS_GONE]
        except ProviderError:
            return None  # the orphan sweep (by label) will still find it later
        return matches[0] if matches else None

    # ---- state ----------------------------------------------------------------------------

    def get(self, instance_id: str) -> ProviderInstance:
        try:
            data = self._post(
                "pod",
                f"query Pod {{\n  pod(input: {{podId: {gql_literal(_check_pod_id(instance_id))}}}) {{\n{POD_FIELDS}  }}\n}}",
            )
        except NotFoundError:
            data = {"pod": None}
        pod = data.get("pod")
        if not pod:
            return ProviderInstance(self.name, instance_id, STATUS_GONE, raw_status=None)
        return self._instance(pod)

    def list(self, label_prefix: str = "") -> list[ProviderInstance]:
        data = self._post(
            "myself.pods", f"query Pods {{\n  myself {{\n    pods {{\n{POD_FIELDS}    }}\n  }}\n}}"
        )
        pods = ((data.get("myself") or {}).get("pods")) or []
        return [self._instance(p) for p in pods if str(p.get("name") or "").startswith(label_prefix)]

    def _instance(self, pod: dict[str, Any]) -> ProviderInstance:
        runtime = pod.get("runtime") or {}
        ssh = next(
            (
                p
                for p in runtime.get("ports") or []
                if p.get("privatePort") == 22 and p.get("isIpPublic") and p.get("type") == "tcp"
            ),
            None,
        )
        utils = [
            g["gpuUtilPercent"] for g in runtime.get("gpus") or [] if g.get("gpuUtilPercent") is not None
        ]
        uptime = runtime.get("uptimeInSeconds")
        status = normalise_status(pod)
        message = None
        if status == STATUS_RUNNING and ssh is None:
            message = "no public SSH port yet"
        return ProviderInstance(
            provider=self.name,
            instance_id=str(pod["id"]),
            status=status,
            raw_status=pod.get("desiredStatus"),
            label=pod.get("name"),
            host_id=pod.get("machineId"),
            ssh_host=ssh["ip"] if ssh else None,
            ssh_port=int(ssh["publicPort"]) if ssh else None,
            ssh_user="root",
            price_per_hour=_decimal(pod.get("costPerHr")),
            gpu_util=sum(utils) / len(utils) if utils else None,
            started_at=time.time() - float(uptime) if uptime is not None else None,
            status_message=message,
            raw=pod,
        )

    # ---- lifecycle ------------------------------------------------------------------------

    def stop(self, instance_id: str) -> None:
        pod_id = gql_literal(_check_pod_id(instance_id))
        self._post(
            "podStop", f"mutation {{\n  podStop(input: {{podId: {pod_id}}}) {{ id desiredStatus }}\n}}"
        )

    def start(self, instance_id: str) -> None:
        """Resume with the GPU count the pod had. RunPod may resume a pod with 0 GPUs when its
        host's GPUs were taken meanwhile: that pod is useless to us, so it is stopped again and
        reported as a CapacityError (launch elsewhere and restore the snapshot)."""
        current = self.get(instance_id)
        if current.status == STATUS_GONE:
            raise NotFoundError(f"RunPod pod {instance_id} does not exist", provider=self.name)
        wanted = int(current.raw.get("gpuCount") or 1)
        pod_id = gql_literal(_check_pod_id(instance_id))
        data = self._post(
            "podResume",
            f"mutation {{\n  podResume(input: {{podId: {pod_id}, gpuCount: {wanted}}}) "
            "{ id desiredStatus gpuCount costPerHr machineId }\n}",
        )
        pod = data.get("podResume") or {}
        if not pod.get("gpuCount"):
            try:
                self.stop(instance_id)
            except ProviderError as e:  # still report the real problem; the caller destroys or retries
                log.warning("RunPod pod %s resumed without GPUs and could not be stopped: %s", instance_id, e)
            raise CapacityError(
                f"RunPod pod {instance_id} resumed with 0 of {wanted} GPUs (the host's GPUs are taken)",
                provider=self.name,
            )

    def destroy(self, instance_id: str) -> None:
        try:
            pod_id = gql_literal(_check_pod_id(instance_id))
            self._post("podTerminate", f"mutation {{\n  podTerminate(input: {{podId: {pod_id}}})\n}}")
        except NotFoundError:
            return  # already gone: destroy is idempotent

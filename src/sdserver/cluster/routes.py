"""GET /v1/cluster: the engine replicas and ingresses, as the job board last heard of them."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from .state import Cluster

router = APIRouter(tags=["operations"])


class MemberOut(BaseModel):
    id: str = Field(description="Ray Serve's replica id")
    kind: Literal["engine", "ingress"]
    state: Literal["up", "down"] = Field(description="down: no heartbeat for 5 s (dead, or its node unreachable)")
    node_ip: str
    node_id: str
    pid: int
    device: str = Field(description='"cuda:0 (NVIDIA ...)", "mps" or "cpu"; empty for an ingress')
    models: list[str] = Field(description="Loaded models, least recently used first")
    queue_depth: int = Field(description="Requests waiting on this replica (more may wait in the ingresses)")
    running_jobs: int = Field(description="Requests in its running set (step batching)")
    running_rows: int = Field(description="Images in its running set")
    jobs_done: int
    accepting: bool
    last_seen_s: float = Field(description="Seconds since its last heartbeat")


class ClusterOut(BaseModel):
    replicas: list[MemberOut] = Field(description="Engine replicas")
    ingresses: list[MemberOut]
    queued: int = Field(description="Jobs waiting, over the whole cluster")
    running: int


@router.get("/v1/cluster", response_model=ClusterOut)
async def cluster(request: Request) -> ClusterOut:
    """Ray Serve: each engine replica's device, loaded models, queue depth and running-set size."""
    state: Cluster = request.app.state.cluster
    snapshot = await state.refresh()
    members = [
        MemberOut(
            id=member.id,
            kind=member.kind,
            state="up" if snapshot.up(member) else "down",
            node_ip=member.node_ip,
            node_id=member.node_id,
            pid=member.pid,
            device=member.device,
            models=member.models,
            queue_depth=member.queue_depth,
            running_jobs=member.running_jobs,
            running_rows=member.running_rows,
            jobs_done=member.jobs_done,
            accepting=member.accepting,
            last_seen_s=round(max(0.0, snapshot.now - member.at), 3),
        )
        for member in sorted(snapshot.members, key=lambda member: (member.kind, member.node_ip, member.id))
    ]
    return ClusterOut(
        replicas=[member for member in members if member.kind == "engine"],
        ingresses=[member for member in members if member.kind == "ingress"],
        queued=snapshot.jobs.get("queued", 0),
        running=snapshot.jobs.get("running", 0),
    )

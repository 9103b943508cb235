"""The job service's store on SQLite and, where SHOAL_TEST_POSTGRES_URL names a server, PostgreSQL."""

import time

import pytest

from shoal.platform.spec import JobSpec
from shoal.platform.store import PENDING, RUNNING, JobStore, Refused, spec_of


def spec(**fields) -> JobSpec:
    return JobSpec(kind="command", command=["true"], **fields)


def test_users_tokens_and_refusals(sql_url):
    store = JobStore(sql_url)
    token = store.add_user("alice", quota_cpus=4)
    assert store.user_for(token)["name"] == "alice" and store.user_for(token)["quota_cpus"] == 4
    assert store.user_for("not-a-token") is None
    with pytest.raises(Refused, match="a user named 'alice' exists"):
        store.add_user("alice")
    with pytest.raises(Refused, match="role: 'root' is not one of admin, user"):
        store.add_user("bob", "root")
    assert not store.has_admin()
    store.add_user("boss", "admin")
    assert store.has_admin()
    store.close()


def test_jobs_submit_once_per_key_change_only_where_allowed_and_are_reread_by_change(sql_url):
    store = JobStore(sql_url)
    store.add_user("alice")
    first, new = store.submit("alice", spec(name="a"), client_key="k")
    again, new_again = store.submit("alice", spec(name="a"), client_key="k")
    assert new and not new_again and again["id"] == first["id"]
    other, _ = store.submit("alice", spec(name="b", workers=2))
    assert spec_of(store.job(other["id"])).workers == 2
    assert [j["id"] for j in store.jobs(user="alice", states=(PENDING,))] == [first["id"], other["id"]]
    seen = time.time()
    assert store.change(first["id"], "started", where_state=(PENDING,), state=RUNNING)
    assert not store.change(first["id"], "started twice", where_state=(PENDING,), state=RUNNING)
    assert [r["id"] for r in store.changed_since(seen - 0.001)] == [first["id"]]
    assert "spec" not in store.active()[0]
    assert set(store.specs([first["id"], other["id"]])) == {first["id"], other["id"]}
    assert [e["text"] for e in store.events(first["id"])] == ["submitted by alice", "started"]
    assert store.counts() == {"running": 1, "pending": 1}
    store.close()

-- The recipients a writer lists after its own write (`authorized_connections_now`) are read on
-- every streamed chunk. As a SQL function that cannot be inlined (it is volatile, so it reads
-- with a snapshot of its own and sees a socket that went live after the statement began), it
-- was planned again on every call: most of its cost. PL/pgSQL keeps one generic plan for the
-- session (a pooled server connection serves many transactions; the plan does not depend on
-- which tenant or conversation), and each of its queries still takes a fresh snapshot under
-- READ COMMITTED.
create or replace function authorized_connections_now(tenant uuid, conversation uuid)
    returns setof ws_connections
    language plpgsql volatile
    set plan_cache_mode = force_generic_plan
    as $$
    begin
        return query select * from live_connections(tenant, conversation);
    end
    $$;

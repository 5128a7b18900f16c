-- A page of history (`messages::page`): the conversation's messages or the path of its current
-- branch, by `seq`, bounded in number and in bytes, each with its siblings.
-- $1 conversation, $2 every branch, $3 the path's start (null: the head), $4 how far it goes,
-- $5 after this seq, $6 before this seq, $7 newest first, $8 at most this many, $9 bytes.
with candidates as (
    select m.* from web_conversation_messages m
    where $2 and m.conversation_id = $1
    union all
    select m.* from branch_path($1, coalesce($3, (select c.head_id
                                                from web_conversations c
                                                where c.id = $1)), $4) b
    join web_conversation_messages m on m.conversation_id = $1 and m.id = b.id
    where not $2
), window_ as (
    select * from candidates
    where ($5::bigint is null or seq > $5) and ($6::bigint is null or seq < $6)
    order by case when $7 then -seq else seq end
    limit $8
), sized as (
    select w.*, sum(octet_length(w.content))
                    over (order by case when $7 then -w.seq else w.seq end) as bytes
    from window_ w
)
select s.*,
       (select coalesce(jsonb_agg(o.id order by o.seq), '[]')
        from web_conversation_messages o
        where o.conversation_id = $1
          and o.parent_id is not distinct from s.parent_id) as siblings
from sized s
where s.bytes - octet_length(s.content) < $9
order by s.seq

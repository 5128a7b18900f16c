drop table user_auth_windows;
alter table ws_connections drop column auth_window_started_at, drop column auth_frames;

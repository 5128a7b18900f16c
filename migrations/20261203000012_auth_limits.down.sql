drop table user_auth_windows;

//! The admin API and the CLI, against a running server.

use crate::harness::*;

#[test]
fn serve_generates_a_private_token_and_answers_with_it() {
    use std::os::unix::fs::PermissionsExt;
    let s = Server::start();
    let mode = std::fs::metadata(s.data_dir.join("admin.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(s.admin().call("GET", "/v1/instances", None).status, 200);
}

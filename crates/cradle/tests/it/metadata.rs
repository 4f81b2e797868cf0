//! The metadata service as guests see it.

use crate::harness::*;
use serde_json::json;

#[test]
fn an_unknown_source_gets_404() {
    let s = Server::start();
    s.admin()
        .create(&json!({"name": "a", "metadata_address": "127.0.0.2"}));
    assert_eq!(s.guest("127.0.0.9").get("/latest/meta-data/").status, 404);
    assert_eq!(
        s.guest("127.0.0.2")
            .get("/latest/meta-data/hostname")
            .text(),
        "a"
    );
}

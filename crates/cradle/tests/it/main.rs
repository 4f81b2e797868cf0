//! Integration tests: the real `cradle` binary on ephemeral ports, driven
//! over HTTP from 127.0.0.x source addresses, and read by real clients
//! (cloud-init, botocore). One test binary keeps link times down.

mod harness;

mod admin;
mod afterburn;
mod agent;
mod appliance;
mod bake;
mod cli;
mod cluster;
mod cluster_firewall;
mod crash;
mod drive;
mod firewall;
mod full_disk;
mod hop_limit;
mod identity;
mod install;
mod isolation;
mod limits;
mod maintenance;
mod metadata;
mod metadata_clients;
mod metadata_tokens;
mod migrate;
mod os;
mod os_jobs;
mod personalize;
mod remote;
mod secgroup_cli;
mod secgroups_api;
mod secrets;
mod trove;
mod vendordata;
mod wait;

//! Integration tests: the host against real `redis-server` processes and real plugins.
//!
//! One test binary (linked once) with a module per area.

mod browser;
mod budgets;
mod cluster;
mod concurrency;
mod contain_effects;
mod contain_files;
mod contain_gateway;
mod contain_sleep;
mod contract;
mod exemplars;
mod faults;
mod gateway;
mod glob_differential;
mod keyspace;
mod kubernetes;
mod languages;
mod loading;
mod outage;
mod outputs;
mod registry;
mod reload;
mod routing;
mod scenarios;
mod streams;
mod tls;
mod tracing;
mod worlds;

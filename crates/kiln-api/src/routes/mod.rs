pub mod files;
pub mod flow;
pub mod jobs;
pub mod keys;
pub mod modules;
pub mod queues;
pub mod system;
pub mod vms;

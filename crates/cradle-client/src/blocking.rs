//! The blocking face: the same [`Request`]s as [`crate::Client`], sent
//! from a thread that waits (the CLI, tests, benches).

use std::io::Write;

use crate::{Error, Reply, Request, Target, read_answer, refusal};

/// A successful answer whose body is read as it comes (`std::io::Read`).
pub type Response = reqwest::blocking::Response;

pub struct Client {
    target: Target,
    http: reqwest::blocking::Client,
    /// For streams a job feeds (an export's dump, an import's): no deadline
    /// on the whole exchange, which lasts as long as the job; a connection
    /// that stalls still fails, and the job has its own deadline.
    streams: reqwest::blocking::Client,
}

impl Client {
    pub fn new(target: Target) -> Result<Client, Error> {
        let mut b = reqwest::blocking::Client::builder().timeout(target.timeout);
        if !target.use_proxy {
            b = b.no_proxy();
        }
        let http = b.build().map_err(|e| target.transport(e))?;
        let mut b = reqwest::blocking::Client::builder()
            .timeout(None)
            .connect_timeout(target.timeout)
            .tcp_keepalive(std::time::Duration::from_secs(30));
        if !target.use_proxy {
            b = b.no_proxy();
        }
        let streams = b.build().map_err(|e| target.transport(e))?;
        Ok(Client {
            target,
            http,
            streams,
        })
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    fn start<T>(&self, req: &Request<T>) -> Result<Response, Error> {
        let mut r = self
            .http
            .request(req.method.clone(), self.target.url(req))
            .headers(self.target.headers(req));
        if let Some(b) = &req.body {
            r = r.body(b.clone());
        }
        r.send().map_err(|e| self.target.transport(e))
    }

    /// Send `req` with no deadline on the whole exchange; a successful
    /// answer's body is left to read as it comes (an export's dump).
    pub fn open_stream<T>(&self, req: Request<T>) -> Result<Response, Error> {
        let mut r = self
            .streams
            .request(req.method.clone(), self.target.url(&req))
            .headers(self.target.headers(&req));
        if let Some(b) = &req.body {
            r = r.body(b.clone());
        }
        let resp = r.send().map_err(|e| self.target.transport(e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = resp.bytes().map_err(|e| self.target.transport(e))?;
        Err(refusal(status, &body))
    }

    /// Send `req` with `body` (`len` bytes) read as it is sent, with no
    /// deadline on the whole exchange (an import's dump); its answer as
    /// the route's view.
    pub fn upload<T>(
        &self,
        req: Request<T>,
        body: impl std::io::Read + Send + 'static,
        len: u64,
    ) -> Result<T, Error> {
        let resp = self
            .streams
            .request(req.method.clone(), self.target.url(&req))
            .headers(self.target.headers(&req))
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(reqwest::blocking::Body::sized(body, len))
            .send()
            .map_err(|e| self.target.transport(e))?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().map_err(|e| self.target.transport(e))?;
        if !(200..300).contains(&status) {
            return Err(refusal(status, &bytes));
        }
        read_answer(&req, &bytes)
    }

    /// Send `req`; its answer as the route's view, or the API's refusal.
    pub fn send<T>(&self, req: Request<T>) -> Result<T, Error> {
        let reply = self.fetch(&req)?;
        if !(200..300).contains(&reply.status) {
            return Err(refusal(reply.status, &reply.body));
        }
        read_answer(&req, &reply.body)
    }

    /// Send `req` and take whatever comes back.
    pub fn fetch<T>(&self, req: &Request<T>) -> Result<Reply, Error> {
        let resp = self.start(req)?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.bytes().map_err(|e| self.target.transport(e))?;
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// Send `req`; a successful answer's body is left to read as it comes.
    pub fn open<T>(&self, req: Request<T>) -> Result<Response, Error> {
        let resp = self.start(&req)?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = resp.bytes().map_err(|e| self.target.transport(e))?;
        Err(refusal(status, &body))
    }

    /// Stream a successful answer's body into `out`; the bytes copied.
    pub fn download<T>(&self, req: Request<T>, out: &mut impl Write) -> Result<u64, Error> {
        let mut resp = self.open(req)?;
        resp.copy_to(out).map_err(|e| self.target.transport(e))
    }
}

//! A signing S3 client for tests (SigV4 with the test key, unsigned payloads): the few calls the
//! tests need, over plain reqwest.

use axum::http::{HeaderMap, HeaderValue, Method};
use cairn_datanode::api::s3::sigv4::{authorization, RequestParts};
use cairn_testkit::keys::{TEST_KEY_ID, TEST_KEY_SECRET};

pub struct S3 {
    pub addr: String,
    /// The bucket `put`, `get` and `put_multipart` use.
    pub bucket: String,
    http: reqwest::blocking::Client,
}

impl S3 {
    pub fn new(addr: &str, bucket: &str) -> Self {
        S3 { addr: addr.to_string(), bucket: bucket.to_string(), http: reqwest::blocking::Client::new() }
    }

    /// A request signed with the test key (SigV4, unsigned payload), `query` in the URL and the
    /// signature alike.
    pub fn request(&self, method: Method, path: &str, query: &[(&str, &str)]) -> reqwest::blocking::RequestBuilder {
        self.signed(method, path, query, &[])
    }

    /// A request with these headers too, signed (S3 wants every `x-amz-*` header signed).
    pub fn signed(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        extra: &[(&str, &str)],
    ) -> reqwest::blocking::RequestBuilder {
        let date = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_str(&self.addr).unwrap());
        headers.insert("x-amz-date", HeaderValue::from_str(&date).unwrap());
        headers.insert("x-amz-content-sha256", HeaderValue::from_static("UNSIGNED-PAYLOAD"));
        for (name, value) in extra {
            headers.insert(
                axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        let pairs: Vec<(String, String)> = query.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let parts = RequestParts { method: &method, raw_path: path, query: &pairs, headers: &headers };
        let auth = authorization(TEST_KEY_ID, TEST_KEY_SECRET, "us-east-1", &parts).unwrap();
        let url = if query.is_empty() {
            format!("http://{}{path}", self.addr)
        } else {
            let q: Vec<String> =
                query.iter().map(|(k, v)| if v.is_empty() { k.to_string() } else { format!("{k}={v}") }).collect();
            format!("http://{}{path}?{}", self.addr, q.join("&"))
        };
        let method = reqwest::Method::from_bytes(method.as_str().as_bytes()).unwrap();
        let mut request = self
            .http
            .request(method, url)
            .header("x-amz-date", date)
            .header("x-amz-content-sha256", "UNSIGNED-PAYLOAD")
            .header("authorization", auth);
        for (name, value) in extra {
            request = request.header(*name, *value);
        }
        request
    }

    pub fn ok(&self, builder: reqwest::blocking::RequestBuilder) -> reqwest::blocking::Response {
        let response = builder.send().unwrap();
        let status = response.status();
        assert!(status.is_success(), "{status}: {}", response.text().unwrap_or_default());
        response
    }

    pub fn put(&self, key: &str, data: &[u8]) {
        self.ok(self.request(Method::PUT, &format!("/{}/{key}", self.bucket), &[]).body(data.to_vec()));
    }

    /// A multipart upload of `parts`, in order.
    pub fn put_multipart(&self, key: &str, parts: &[&[u8]]) {
        let id = self.create_upload(key);
        let etags: Vec<String> =
            parts.iter().enumerate().map(|(i, part)| self.upload_part(key, &id, i as u32 + 1, part)).collect();
        let done = self.complete(key, &id, &etags);
        assert!(done.status().is_success(), "{}: {}", done.status(), done.text().unwrap_or_default());
    }

    /// CreateMultipartUpload: the upload id.
    pub fn create_upload(&self, key: &str) -> String {
        let path = format!("/{}/{key}", self.bucket);
        let created = self.ok(self.request(Method::POST, &path, &[("uploads", "")])).text().unwrap();
        created.split("<UploadId>").nth(1).and_then(|s| s.split("</UploadId>").next()).unwrap().to_string()
    }

    /// UploadPart: the part's ETag (quoted).
    pub fn upload_part(&self, key: &str, upload_id: &str, number: u32, data: &[u8]) -> String {
        let response = self.try_upload_part(key, upload_id, number, data);
        let status = response.status();
        assert!(status.is_success(), "{status}: {}", response.text().unwrap_or_default());
        response.headers()["etag"].to_str().unwrap().to_string()
    }

    pub fn try_upload_part(&self, key: &str, upload_id: &str, number: u32, data: &[u8]) -> reqwest::blocking::Response {
        let path = format!("/{}/{key}", self.bucket);
        let n = number.to_string();
        self.request(Method::PUT, &path, &[("partNumber", &n), ("uploadId", upload_id)])
            .body(data.to_vec())
            .send()
            .unwrap()
    }

    /// CompleteMultipartUpload of parts 1, 2, … with these ETags: the answer, whatever it is.
    pub fn complete(&self, key: &str, upload_id: &str, etags: &[String]) -> reqwest::blocking::Response {
        let path = format!("/{}/{key}", self.bucket);
        let mut listed = String::from("<CompleteMultipartUpload>");
        for (i, etag) in etags.iter().enumerate() {
            listed += &format!("<Part><PartNumber>{}</PartNumber><ETag>{etag}</ETag></Part>", i + 1);
        }
        listed += "</CompleteMultipartUpload>";
        self.request(Method::POST, &path, &[("uploadId", upload_id)]).body(listed).send().unwrap()
    }

    /// The upload ids ListMultipartUploads shows.
    pub fn uploads(&self) -> Vec<String> {
        let text = self.ok(self.request(Method::GET, &format!("/{}", self.bucket), &[("uploads", "")])).text().unwrap();
        text.split("<UploadId>").skip(1).filter_map(|s| s.split("</UploadId>").next()).map(str::to_string).collect()
    }

    pub fn get(&self, key: &str, range: Option<(u64, u64)>) -> Vec<u8> {
        let mut request = self.request(Method::GET, &format!("/{}/{key}", self.bucket), &[]);
        if let Some((a, b)) = range {
            request = request.header("range", format!("bytes={a}-{b}"));
        }
        self.ok(request).bytes().unwrap().to_vec()
    }
}

//! The S3 front of a standalone datanode against real, unmodified clients: boto3's suite
//! (e2e/s3/boto3_suite.py), the AWS CLI and rclone as users run them, and kill -9 in the middle
//! of uploads (every acknowledged object reads back whole after the restart).
//!
//! boto3 and the AWS CLI come from PyPI into `.tools/s3-venv`, rclone from Debian
//! (`scripts/install-deps.sh` installs both).

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cairn_testkit::keys::{TEST_KEY_ID, TEST_KEY_SECRET};
use support::{free_port, repo, KillOnDrop};

/// Bytes of an object per blob: small, so that the suite crosses piece boundaries cheaply.
const PIECE_BYTES: u64 = 256 << 10;

fn venv_bin(tool: &str) -> PathBuf {
    let path = PathBuf::from(repo(&format!(".tools/s3-venv/bin/{tool}")));
    assert!(path.exists(), "{} missing: run scripts/install-deps.sh", path.display());
    path
}

struct S3Node {
    node: Option<KillOnDrop>,
    blob_addr: String,
    s3_addr: String,
    data: PathBuf,
    _dir: tempfile::TempDir,
}

impl S3Node {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("node");
        let mut node = S3Node {
            node: None,
            blob_addr: format!("127.0.0.1:{}", free_port()),
            s3_addr: format!("127.0.0.1:{}", free_port()),
            data,
            _dir: dir,
        };
        node.run();
        node
    }

    /// Starts (or restarts) the node on its data directory.
    fn run(&mut self) {
        let piece = format!("{PIECE_BYTES}B");
        let flags = [
            "--data-dir",
            self.data.to_str().unwrap(),
            "--partitions",
            "3",
            "--volume-size",
            "512MiB",
            "--segment-size",
            "64MiB",
            "--max-blob-size",
            "1MiB",
            "--s3-listen",
            &self.s3_addr,
            "--s3-piece-size",
            &piece,
            "--s3-max-object-size",
            "64MiB",
        ];
        self.node = Some(support::standalone_datanode(&self.blob_addr, &flags));
    }

    fn kill_9(&mut self) {
        let mut node = self.node.take().expect("running");
        unsafe { libc::kill(node.0.id() as i32, libc::SIGKILL) };
        let _ = node.0.wait();
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.s3_addr)
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("S3_ENDPOINT", self.endpoint()),
            ("S3_KEY_ID", TEST_KEY_ID.into()),
            ("S3_SECRET", TEST_KEY_SECRET.into()),
            ("S3_PIECE_BYTES", PIECE_BYTES.to_string()),
            ("AWS_ACCESS_KEY_ID", TEST_KEY_ID.into()),
            ("AWS_SECRET_ACCESS_KEY", TEST_KEY_SECRET.into()),
            ("AWS_DEFAULT_REGION", "us-east-1".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
            ("AWS_CONFIG_FILE", "/dev/null".into()),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".into()),
        ]
    }
}

fn python(node: &S3Node, script: &str, args: &[&str]) -> Command {
    let mut command = Command::new(venv_bin("python"));
    command.arg(repo(&format!("e2e/s3/{script}"))).args(args).envs(node.env());
    command
}

#[test]
fn boto3_finds_cairn_behaving_as_s3() {
    let node = S3Node::start();
    let status = python(&node, "boto3_suite.py", &[]).status().unwrap();
    assert!(status.success(), "the boto3 suite failed (its output above names the check)");
    // Name records are the S3 front's: the blob API refuses their ids, whoever asks.
    let name_id = cairn_common::BlobId::name(0, 42);
    for method in [reqwest::Method::GET, reqwest::Method::DELETE] {
        let answer = reqwest::blocking::Client::new()
            .request(method.clone(), format!("http://{}/v1/blobs/{name_id}", node.blob_addr))
            .header("Authorization", cairn_testkit::keys::authorization())
            .send()
            .unwrap();
        assert_eq!(answer.status(), 400, "{method} of a name id through the blob API");
    }
}

fn run(command: &mut Command) -> String {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{command:?} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn write_file(path: &Path, len: usize, seed: u8) -> Vec<u8> {
    let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
    std::fs::File::create(path).unwrap().write_all(&data).unwrap();
    data
}

#[test]
fn the_aws_cli_and_rclone_work_unchanged() {
    let node = S3Node::start();
    let dir = tempfile::tempdir().unwrap();
    let aws = || {
        let mut c = Command::new(venv_bin("aws"));
        c.envs(node.env()).args(["--endpoint-url", &node.endpoint()]);
        c
    };
    // The AWS CLI: mb, cp both ways (5 MiB, under its 8 MiB multipart threshold), ls, rm, rb.
    let local = dir.path().join("five");
    let data = write_file(&local, 5 << 20, 3);
    run(aws().args(["s3", "mb", "s3://cli-bucket"]));
    run(aws().args(["s3", "cp", local.to_str().unwrap(), "s3://cli-bucket/some/five.bin"]));
    let listed = run(aws().args(["s3", "ls", "s3://cli-bucket/some/"]));
    assert!(listed.contains(&format!("{} five.bin", 5 << 20)), "{listed}");
    let back = dir.path().join("back");
    run(aws().args(["s3", "cp", "s3://cli-bucket/some/five.bin", back.to_str().unwrap()]));
    assert_eq!(std::fs::read(&back).unwrap(), data);
    let head = run(aws().args(["s3api", "head-object", "--bucket", "cli-bucket", "--key", "some/five.bin"]));
    let md5 = format!("{:x}", md5_of(&data));
    assert!(head.contains(&md5), "ETag is the MD5: {head}");
    // 20 MiB: over the CLI's 8 MiB threshold, a multipart upload of three parts; a ranged,
    // concurrent download.
    let big = dir.path().join("twenty");
    let big_data = write_file(&big, 20 << 20, 5);
    run(aws().args(["s3", "cp", big.to_str().unwrap(), "s3://cli-bucket/big.bin"]));
    let head = run(aws().args(["s3api", "head-object", "--bucket", "cli-bucket", "--key", "big.bin"]));
    assert!(head.contains("-3\\\""), "a multipart ETag of three parts: {head}");
    let big_back = dir.path().join("twenty-back");
    run(aws().args(["s3", "cp", "s3://cli-bucket/big.bin", big_back.to_str().unwrap()]));
    assert!(std::fs::read(&big_back).unwrap() == big_data, "the multipart object read back differs");
    let uploads = run(aws().args(["s3api", "list-multipart-uploads", "--bucket", "cli-bucket"]));
    assert!(!uploads.contains("UploadId"), "no upload left in progress: {uploads}");
    run(aws().args(["s3", "rm", "s3://cli-bucket/big.bin"]));
    run(aws().args(["s3", "rm", "s3://cli-bucket/some/five.bin"]));
    run(aws().args(["s3", "rb", "s3://cli-bucket"]));
    let buckets = run(aws().args(["s3", "ls"]));
    assert!(!buckets.contains("cli-bucket"), "{buckets}");

    // rclone (Debian's): copy a tree up, check it byte for byte (MD5 against the ETags), list,
    // sync a change, purge.
    let tree = dir.path().join("tree");
    // big.bin is over the 5 MiB upload cutoff set below: rclone uploads it in 5 MiB parts.
    for (i, name) in ["a.txt", "sub/b.bin", "sub/deeper/c.bin", "empty", "big.bin"].iter().enumerate() {
        let path = tree.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        write_file(&path, [10, 300_000, 1 << 20, 0, (12 << 20) + 5][i], i as u8);
    }
    let rclone = || {
        let mut c = Command::new("rclone");
        // rclone 1.60's AWS SDK cannot take a CA bundle with its own transport (and needs none
        // over plain HTTP): a machine-wide AWS_CA_BUNDLE would stop it before any request.
        c.env_remove("AWS_CA_BUNDLE")
            .env("RCLONE_CONFIG", "/dev/null")
            .env("RCLONE_CONFIG_CAIRN_TYPE", "s3")
            .env("RCLONE_CONFIG_CAIRN_PROVIDER", "Other")
            .env("RCLONE_CONFIG_CAIRN_ENDPOINT", node.endpoint())
            .env("RCLONE_CONFIG_CAIRN_ACCESS_KEY_ID", TEST_KEY_ID)
            .env("RCLONE_CONFIG_CAIRN_SECRET_ACCESS_KEY", TEST_KEY_SECRET)
            .env("RCLONE_CONFIG_CAIRN_REGION", "us-east-1")
            .env("RCLONE_CONFIG_CAIRN_FORCE_PATH_STYLE", "true")
            .env("RCLONE_CONFIG_CAIRN_UPLOAD_CUTOFF", "5M")
            .env("RCLONE_CONFIG_CAIRN_CHUNK_SIZE", "5M");
        c
    };
    let tree_arg = tree.to_str().unwrap();
    run(rclone().args(["mkdir", "cairn:rc-bucket"]));
    run(rclone().args(["copy", tree_arg, "cairn:rc-bucket/t"]));
    run(rclone().args(["check", tree_arg, "cairn:rc-bucket/t"]));
    let files = run(rclone().args(["lsf", "-R", "cairn:rc-bucket/t"]));
    for name in ["a.txt", "sub/b.bin", "sub/deeper/c.bin", "empty", "big.bin"] {
        assert!(files.lines().any(|l| l == name), "{name} not in {files}");
    }
    write_file(&tree.join("a.txt"), 20, 9);
    std::fs::remove_file(tree.join("sub/b.bin")).unwrap();
    run(rclone().args(["sync", tree_arg, "cairn:rc-bucket/t"]));
    run(rclone().args(["check", tree_arg, "cairn:rc-bucket/t"]));
    run(rclone().args(["purge", "cairn:rc-bucket"]));
    let buckets = run(rclone().args(["lsd", "cairn:"]));
    assert!(!buckets.contains("rc-bucket"), "{buckets}");
}

fn md5_of(data: &[u8]) -> u128 {
    use md5::Digest;
    u128::from_be_bytes(md5::Md5::digest(data).into())
}

#[test]
fn every_acknowledged_object_survives_kill_9_during_uploads() {
    let mut node = S3Node::start();
    let mut writer = python(&node, "crash_writer.py", &["write"]).stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(writer.stdout.take().unwrap()).lines();
    // "begin <op>" before a request, "acked <op>" once answered: the verifier allows an
    // operation in flight at the kill to have happened or not, and nothing else.
    let mut log = Vec::new();
    let (mut acked, mut multipart_acked) = (0, 0);
    // Each writer thread's operation in flight; a multipart put's ETag ends in -N.
    let mut in_flight = std::collections::BTreeMap::new();
    let is_multipart =
        |op: &str| op.starts_with("put ") && op.rsplit(' ').next().is_some_and(|etag| etag.contains('-'));
    for line in lines.by_ref() {
        let line = line.unwrap();
        let mut words = line.splitn(3, ' ');
        let (kind, thread, op) = (words.next().unwrap(), words.next().unwrap(), words.next().unwrap_or(""));
        match kind {
            "begin" => {
                in_flight.insert(thread.to_string(), op.to_string());
            }
            _ => {
                in_flight.remove(thread);
                acked += 1;
                multipart_acked += usize::from(is_multipart(op));
            }
        }
        let multipart_in_flight = in_flight.values().any(|op| is_multipart(op));
        log.push(line);
        // Enough acknowledged operations (overwrites, deletes and multipart uploads among
        // them), and a multipart upload in flight: the node dies in the middle of its parts.
        if (acked >= 150 && multipart_acked >= 2 && multipart_in_flight) || acked == 600 {
            std::thread::sleep(std::time::Duration::from_millis(25));
            node.kill_9();
            break;
        }
    }
    let _ = writer.kill();
    let _ = writer.wait();
    // What the writer printed that was not read yet: operations it began (and even had
    // answered) before the kill.
    log.extend(lines.map_while(Result::ok));
    node.run();
    let mut verifier = python(&node, "crash_writer.py", &["verify"]).stdin(Stdio::piped()).spawn().unwrap();
    verifier.stdin.take().unwrap().write_all(log.join("\n").as_bytes()).unwrap();
    let status = verifier.wait().unwrap();
    assert!(status.success(), "an acknowledged object did not survive kill -9 (the verifier says which)");
}

/// The `s3` stage of docker/Dockerfile — the throwaway S3 server a CI pipeline runs — as the
/// container would run it: the binary with no arguments, that stage's environment and a key, as
/// the image's user (65532). (Only the data directory and ports differ, to run beside other
/// tests.) It answers S3 at once, and the AWS CLI round-trips an object through it.
#[test]
fn the_ci_image_starts_an_s3_server_from_its_environment_alone() {
    let dockerfile = std::fs::read_to_string(repo("docker/Dockerfile")).unwrap();
    let stage: String = dockerfile
        .split("\nFROM ")
        .find(|s| s.starts_with("datanode AS s3"))
        .expect("an s3 stage built FROM the datanode stage")
        .replace("\\\n", " ");
    let mut env: Vec<(String, String)> = stage
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ENV "))
        .flat_map(|l| l.split_whitespace().map(|kv| kv.split_once('=').expect("ENV K=V")).collect::<Vec<_>>())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let get = |env: &[(String, String)], k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let s3_listen = get(&env, "CAIRN_S3_LISTEN").expect("the stage sets CAIRN_S3_LISTEN");
    let port = s3_listen.rsplit(':').next().unwrap();
    assert!(stage.contains(&format!("EXPOSE {port}")), "the stage exposes its S3 port");
    let datanode_stage = dockerfile.split("\nFROM ").find(|s| s.starts_with("runtime AS datanode")).unwrap();
    assert!(datanode_stage.contains("USER 65532:65532"));
    // Beside other tests: own directory and ports.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let s3_addr = format!("127.0.0.1:{}", free_port());
    for (k, v) in [
        ("CAIRN_DATA_DIR", dir.path().join("cairn").to_str().unwrap().to_string()),
        ("CAIRN_S3_LISTEN", s3_addr.clone()),
        ("CAIRN_LISTEN", format!("127.0.0.1:{}", free_port())),
    ] {
        assert!(get(&env, k).is_some(), "the stage sets {k}");
        env.retain(|(n, _)| n != k);
        env.push((k.to_string(), v));
    }
    use std::os::unix::process::CommandExt;
    let started = std::time::Instant::now();
    let child = Command::new(support::binary("cairn-datanode"))
        .uid(65532)
        .gid(65532)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .envs(cairn_testkit::keys::root_key_env())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let _node = KillOnDrop(child);
    // Any S3 answer (an unsigned request is AccessDenied): the server is up.
    support::wait_until("the S3 port answers", std::time::Duration::from_secs(30), || {
        reqwest::blocking::get(format!("http://{s3_addr}/")).is_ok_and(|r| r.status() == 403)
    });
    println!("the CI image's S3 server answered {:?} after exec (debug build)", started.elapsed());
    let node = S3Node {
        node: None,
        blob_addr: String::new(),
        s3_addr,
        data: dir.path().to_owned(),
        _dir: tempfile::tempdir().unwrap(),
    };
    let aws = || {
        let mut c = Command::new(venv_bin("aws"));
        c.envs(node.env()).args(["--endpoint-url", &node.endpoint()]);
        c
    };
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("artifact");
    let data = write_file(&file, 300_000, 7);
    run(aws().args(["s3", "mb", "s3://ci-artifacts"]));
    run(aws().args(["s3", "cp", file.to_str().unwrap(), "s3://ci-artifacts/build/artifact"]));
    let back = work.path().join("back");
    run(aws().args(["s3", "cp", "s3://ci-artifacts/build/artifact", back.to_str().unwrap()]));
    assert!(std::fs::read(&back).unwrap() == data);
}

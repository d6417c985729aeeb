"""An S3-compatible server for the S3 adapter tests: moto's server on loopback, with
authentication on.

    python s3_server.py PORT BUCKET PREFIX=DIR [PREFIX=DIR ...]

Moto checks nothing until INITIAL_NO_AUTH_ACTION_COUNT requests have been served; this script
spends exactly those on its setup (an IAM user, an access key, a policy allowing S3 reads and
writes, the bucket, and each DIR's files uploaded under BUCKET/PREFIX/), checks that a request
with an unknown key is now refused, then prints one JSON line (`endpoint`, `access_key_id`,
`secret_access_key`, `bucket`) and serves until killed or until its standard input closes.
Moto's request log (one line per request, e.g. `"GET /bucket/key HTTP/1.1" 200`) goes to
standard error.
"""

import contextlib
import json
import os
import sys
import threading


def main() -> None:
    port = int(sys.argv[1])
    bucket = sys.argv[2]
    uploads = []
    for arg in sys.argv[3:]:
        prefix, directory = arg.split("=", 1)
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                uploads.append((f"{prefix}/{name}", path))
    # The setup's requests, all unauthenticated: create_user, create_access_key,
    # put_user_policy, create_bucket, one put_object per file.
    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = str(4 + len(uploads))
    os.environ.setdefault("MOTO_ALLOW_NONEXISTENT_REGION", "true")

    # Imported after the environment is set: moto reads it at import time.
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=True)
    with contextlib.redirect_stdout(sys.stderr):  # moto announces itself on stdout
        server.start()
    endpoint = f"http://127.0.0.1:{port}"
    config = Config(retries={"max_attempts": 1}, s3={"addressing_style": "path"})

    def client(service, key="setup", secret="setup"):
        return boto3.client(
            service,
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            config=config,
        )

    iam = client("iam")
    iam.create_user(UserName="medley")
    key = iam.create_access_key(UserName="medley")["AccessKey"]
    iam.put_user_policy(
        UserName="medley",
        PolicyName="s3",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
            }
        ),
    )
    s3 = client("s3")
    s3.create_bucket(Bucket=bucket)
    for object_key, path in uploads:
        with open(path, "rb") as f:
            s3.put_object(Bucket=bucket, Key=object_key, Body=f.read())

    # Authentication is on from here: an unknown key is refused, the user's key works.
    try:
        client("s3", "AKIDUNKNOWN", "nope").list_objects_v2(Bucket=bucket)
        sys.exit("moto accepted an unknown access key: authentication is off")
    except ClientError as e:
        code = e.response["Error"]["Code"]
        if code != "InvalidAccessKeyId":
            sys.exit(f"unexpected error for an unknown key: {code}")
    listed = client("s3", key["AccessKeyId"], key["SecretAccessKey"]).list_objects_v2(
        Bucket=bucket
    )
    if listed.get("KeyCount", 0) != len(uploads):
        sys.exit(f"expected {len(uploads)} objects, listed {listed.get('KeyCount')}")

    print(
        json.dumps(
            {
                "endpoint": endpoint,
                "access_key_id": key["AccessKeyId"],
                "secret_access_key": key["SecretAccessKey"],
                "bucket": bucket,
            }
        ),
        flush=True,
    )
    done = threading.Event()

    def watch_stdin():
        sys.stdin.read()
        done.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    done.wait()
    server.stop()


if __name__ == "__main__":
    main()

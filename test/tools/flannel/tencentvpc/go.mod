// A stand-in for Tencent Cloud's VPC SDK, which the Go module proxy does not
// serve. flanneld links its tencent-vpc backend unconditionally; the tests run
// the vxlan backend, so this module only has to compile: every call fails.
module github.com/tencentcloud/tencentcloud-sdk-go/tencentcloud/vpc

go 1.26.8
